"""Translate with a trained checkpoint.

    python translate.py --checkpoint runs/opus_books/best.pt "I am tired." "Where is the station?"
    echo "I am tired." | python translate.py --checkpoint best.pt --beam 4
    python translate.py --checkpoint best.pt --eval pairs.jsonl     # prints {"n", "bleu", "chrf", ...}

One translation per input (argument or stdin line), in input order; an empty line gives an empty line.
"""
import argparse
import json
import sys
import time

import torch

import dataset
from model import Transformer, translate
from train import MODEL_FIELDS, load_checkpoint


def load_translator(path, device):
    """(model, src_tokenizer, tgt_tokenizer, config dict) from a self-contained checkpoint."""
    checkpoint = load_checkpoint(path, map_location=device)
    cfg = checkpoint["config"]
    src_tokenizer, tgt_tokenizer = (dataset.tokenizer_from_json(text) for text in checkpoint["tokenizers"])
    model = Transformer(src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size(),
                        dataset.special_ids(tgt_tokenizer)["pad"], **{name: cfg[name] for name in MODEL_FIELDS})
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), src_tokenizer, tgt_tokenizer, cfg


def translate_texts(texts, model, src_tokenizer, tgt_tokenizer, word_level, beam=1, alpha=0.6, max_len=0):
    ids = dataset.special_ids(tgt_tokenizer)
    todo = [i for i, text in enumerate(texts) if text.strip()]
    sources = dataset.encode(src_tokenizer, [texts[i].strip() for i in todo])
    outputs = translate(model, sources, ids["sos"], ids["eos"], beam, alpha, max_len=max_len)
    results = [""] * len(texts)
    for i, output in zip(todo, outputs):
        results[i] = dataset.decode(tgt_tokenizer, output, word_level)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train.py")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    parser.add_argument("--length_penalty", type=float, default=0.6, help="GNMT length-penalty alpha for beam search")
    parser.add_argument("--max_len", type=int, default=0, help="most tokens per translation (0 = source length + 50)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--eval", metavar="FILE", help="score translations of a .jsonl (opus_books rows) or .tsv "
                                                       "(source<TAB>reference) file with sacrebleu; prints JSON")
    parser.add_argument("texts", nargs="*", help="sentences to translate (default: one per line of stdin)")
    args = parser.parse_args(argv)
    if args.beam < 1 or args.max_len < 0:
        parser.error("--beam must be at least 1 and --max_len not negative")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model, src_tokenizer, tgt_tokenizer, cfg = load_translator(args.checkpoint, device)
    word_level = cfg["tokenizer"] == "word"
    options = dict(beam=args.beam, alpha=args.length_penalty, max_len=args.max_len)

    if args.eval:
        import sacrebleu
        pairs, _ = dataset.read_pairs([args.eval], cfg["lang_src"], cfg["lang_tgt"])
        started = time.time()
        hypotheses = translate_texts([s for s, _ in pairs], model, src_tokenizer, tgt_tokenizer, word_level, **options)
        seconds = time.time() - started
        references = [[t for _, t in pairs]]
        print(json.dumps({"n": len(pairs), "bleu": sacrebleu.corpus_bleu(hypotheses, references).score,
                          "chrf": sacrebleu.corpus_chrf(hypotheses, references).score,
                          "sentences_per_sec": len(pairs) / seconds, "beam": args.beam}))
        return
    texts = args.texts or sys.stdin.read().splitlines()
    for line in translate_texts(texts, model, src_tokenizer, tgt_tokenizer, word_level, **options):
        print(line)


if __name__ == "__main__":
    main()
