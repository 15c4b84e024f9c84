"""How good a set of translations is: corpus BLEU and chrF (sacrebleu), character and word error rates
(torchmetrics), all on detokenized text. train.py scores validation with it, translate.py --eval a file. And how
close training runs to the hardware's limit."""


def score(hypotheses, references):
    """{"bleu", "chrf", "cer", "wer"} of these hypotheses against one reference each."""
    import sacrebleu  # both are slow to import and only needed once something is scored
    from torchmetrics.functional.text import char_error_rate, word_error_rate
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "cer": float(char_error_rate(hypotheses, references)),
            "wer": float(word_error_rate(hypotheses, references))}


def fraction_of_peak(tokens_per_sec, flops_per_token, peak_flops):
    """Achieved matmul FLOP/s over the measured peak (model FLOPs utilisation), or None where unmeasured."""
    return tokens_per_sec * flops_per_token / peak_flops if peak_flops else None
