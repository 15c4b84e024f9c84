import torch
from torch.optim.swa_utils import AveragedModel

from averaging import WeightAverage
from conftest import make_model


def warmed_up_ema(averaged, current, n_averaged):  # TensorFlow's warm-up of the decay, up to 0.5
    decay = min(0.5, (1 + float(n_averaged)) / (10 + float(n_averaged)))
    return decay * averaged + (1 - decay) * current


def test_weight_average_computes_what_pytorchs_averaged_model_does():
    """Over 12 updates: the decay warms up ((1 + n) / (10 + n) < 0.5 until n = 8), then holds."""
    model = make_model(share="cycle_rev", n_layers=4, n_unique=2, tie=True)
    ours, theirs = WeightAverage(model, 0.5), AveragedModel(model, avg_fn=warmed_up_ema)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        ours.update(model)
        theirs.update_parameters(model)
    assert ours.updates == int(theirs.n_averaged) == 12
    for (name, mine), (_, reference) in zip(ours.module.state_dict().items(), theirs.module.state_dict().items()):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(ours.module.output.weight, model.output.weight)  # an average, not a copy
    # shared blocks and tied embeddings stay one tensor in the average
    assert ours.module.encoder_layers[0] is ours.module.encoder_layers[3]
    assert ours.module.src_embed.weight is ours.module.output.weight
    assert not any(p.requires_grad for p in ours.module.parameters())
