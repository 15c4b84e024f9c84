import pytest
import torch
import torch.nn.functional as F

import batching
import step
from conftest import PAD, SOS, make_model, random_batch
from runtime import Precision
from model import layer_layout, positions_in_segment


def test_forward_shapes():
    model = make_model(vocab=50)
    src, tgt = random_batch([5, 3, 7], vocab=50), random_batch([4, 6, 2], vocab=50, seed=1)
    assert model(src, tgt).shape == (3, 6, 50)
    memory, mask = model.encode(src)
    assert memory.shape == (3, 7, 32) and mask.shape == (3, 1, 1, 7)


def test_decoder_is_causal():
    model = make_model()
    src, tgt = random_batch([6]), random_batch([8], seed=1)
    changed = tgt.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 36 + 4
    before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_padding_does_not_change_a_sentence():
    model = make_model(share="cycle_rev", n_layers=4, n_unique=2)
    src, tgt = random_batch([4, 9, 6]), random_batch([3, 5, 10], seed=1)
    memory, _ = model.encode(src)
    logits = model(src, tgt)
    for row, (src_len, tgt_len) in enumerate([(4, 3), (9, 5), (6, 10)]):
        alone_memory, _ = model.encode(src[row:row + 1, :src_len])
        alone_logits = model(src[row:row + 1, :src_len], tgt[row:row + 1, :tgt_len])
        torch.testing.assert_close(memory[row:row + 1, :src_len], alone_memory, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[row:row + 1, :tgt_len], alone_logits, rtol=0, atol=1e-5)


def test_positions_restart_at_every_packed_sentence():
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert positions_in_segment(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("tie", [False, True])
def test_packed_rows_give_every_sentence_its_unpacked_logits_and_gradients(tie):
    src_lens, tgt_lens = [4, 9, 6, 3, 7, 2], [3, 5, 10, 2, 6, 4]
    sources, targets = random_batch(src_lens), random_batch(tgt_lens, seed=1)
    examples = [(sources[i, :s], torch.cat([torch.tensor([SOS]), targets[i, :t - 1]]), targets[i, :t])
                for i, (s, t) in enumerate(zip(src_lens, tgt_lens))]
    model = make_model(share="cycle_rev", n_layers=4, n_unique=2, tie=tie).train()  # dropout 0: deterministic

    def run(batch):
        model.zero_grad()
        logits = model(batch["src"], batch["tgt_in"], batch.get("src_segments"), batch.get("tgt_segments"))
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=PAD, reduction="sum").backward()
        return logits, {name: p.grad.clone() for name, p in model.named_parameters()}

    padded = batching.collate(examples, PAD)
    packed = batching.collate(examples, PAD, pack_length=12)
    assert packed["src"].size(0) < len(examples)  # sentences really share rows
    padded_logits, padded_grads = run(padded)
    packed_logits, packed_grads = run(packed)
    for row in range(packed["src"].size(0)):
        for number in packed["tgt_segments"][row].unique().tolist():
            if number:
                in_sentence = packed["tgt_segments"][row] == number
                labels = packed["labels"][row][in_sentence]
                i = next(i for i, (_, _, y) in enumerate(examples) if torch.equal(y, labels))
                torch.testing.assert_close(packed_logits[row][in_sentence], padded_logits[i, :len(labels)],
                                           rtol=0, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("share, n, m, expected", [
    ("sequence", 6, 3, [0, 0, 1, 1, 2, 2]),
    ("cycle", 6, 3, [0, 1, 2, 0, 1, 2]),
    ("cycle_rev", 6, 3, [0, 1, 2, 2, 1, 0]),
    ("none", 6, 3, [0, 1, 2, 3, 4, 5]),
    ("cycle_rev", 7, 3, [0, 1, 2, 0, 1, 2, 2]),
    ("cycle_rev", 8, 3, [0, 1, 2, 0, 1, 2, 2, 1]),  # Takase: layer i>M(ceil(N/M)-1) uses M-1-((i) mod M)
    ("sequence", 4, 4, [0, 1, 2, 3]),
    ("cycle", 5, 1, [0, 0, 0, 0, 0]),
])
def test_sharing_layouts(share, n, m, expected):
    assert layer_layout(share, n, m) == expected


@pytest.mark.parametrize("share", ["sequence", "cycle", "cycle_rev"])
def test_shared_layers_are_the_same_objects(share):
    model = make_model(share=share, n_layers=6, n_unique=3)
    layout = layer_layout(share, 6, 3)
    for layers in (model.encoder_layers, model.decoder_layers):
        for i in range(6):
            for j in range(6):
                assert (layers[i] is layers[j]) == (layout[i] == layout[j])
    # a shared block gets one gradient from all its uses
    model(random_batch([5]), random_batch([4], seed=1)).sum().backward()
    first = model.encoder_layers[0].ff[0].weight
    assert first.grad is not None and len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def test_unique_parameters_fall_with_sharing_and_tying():
    unshared = make_model(n_layers=6, n_unique=6).parameter_counts()
    shared = make_model(share="cycle_rev", n_layers=6, n_unique=3).parameter_counts()
    tied = make_model(share="cycle_rev", n_layers=6, n_unique=3, tie=True).parameter_counts()
    assert unshared[0] == unshared[1] == shared[0] == tied[0]  # same computation either way
    block = sum(p.numel() for p in make_model().encoder_layers[0].parameters()) + \
        sum(p.numel() for p in make_model().decoder_layers[0].parameters())
    assert unshared[1] - shared[1] == 3 * block
    assert shared[1] - tied[1] == 2 * 40 * 32  # two of the three embedding matrices disappear
    tied_model = make_model(tie=True)
    assert tied_model.src_embed.weight is tied_model.tgt_embed.weight is tied_model.output.weight


def test_tying_needs_one_vocabulary():
    from model import Transformer
    with pytest.raises(ValueError, match="joint vocabulary"):
        Transformer(10, 12, PAD, d_model=8, n_heads=2, d_ff=8, n_layers=1, n_unique_layers=1, tie_embeddings=True)


def test_a_tiny_model_memorises_sixteen_pairs():
    from config import Config
    cfg = Config(lr=3e-3, label_smoothing=0.0, dropout=0.0, grad_clip=1.0)
    torch.manual_seed(0)
    src, tgt = random_batch([3 + i % 5 for i in range(16)], vocab=30), random_batch([2 + i % 6 for i in range(16)],
                                                                                    vocab=30, seed=1)
    tgt_in = torch.cat([torch.full((16, 1), SOS), tgt[:, :-1]], 1).masked_fill(tgt == PAD, PAD)
    batch = {"src": src, "tgt_in": tgt_in, "labels": tgt}
    model = make_model(vocab=30, d_model=64).train()
    steps = 300
    optimizer, scheduler = step.make_optimizer(cfg, model, torch.device("cpu"), steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(steps):
        loss_sum, n_tokens, _, _ = step.train_step(model, [batch], optimizer, step.Schedule(scheduler), scaler,
                                                    Precision(torch.device("cpu")), cfg, PAD)
    assert float(loss_sum) / int(n_tokens) < 0.3


def test_a_shallow_decoder_draws_on_its_own_blocks():
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(40, 40, PAD, d_model=32, n_heads=4, d_ff=64, n_layers=6, n_unique_layers=3,
                        share="cycle_rev", n_decoder_layers=2).eval()
    assert model.layout == [0, 1, 2, 2, 1, 0] and model.decoder_layout == layer_layout("cycle_rev", 2, 2)
    assert len(model.encoder_layers) == 6 and len(set(model.encoder_layers)) == 3
    assert len(model.decoder_layers) == 2 and len(set(model.decoder_layers)) == 2
    src, tgt = random_batch([6, 4]), random_batch([5, 3], seed=1)
    assert model(src, tgt).shape == (2, 5, 40)
    deep = Transformer(40, 40, PAD, d_model=32, n_heads=4, d_ff=64, n_layers=6, n_unique_layers=3, share="cycle_rev")
    lengths = [10] * 3, [12] * 3
    assert model.training_flops_per_token(lengths) < 0.75 * deep.training_flops_per_token(lengths)
    assert len(deep.decoder_layers) == 6  # 0: as many decoder layers as encoder layers
