import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from averaging import WeightAverage
from conftest import make_model


def test_weight_average_computes_what_pytorchs_averaged_model_does():
    model = make_model(share="cycle_rev", n_layers=4, n_unique=2, tie=True)
    ours, theirs = WeightAverage(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))
        ours.update(model)
        theirs.update_parameters(model)
    assert ours.updates == int(theirs.n_averaged) == 5
    for (name, mine), (_, reference) in zip(ours.module.state_dict().items(), theirs.module.state_dict().items()):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(ours.module.output.weight, model.output.weight)  # an average, not a copy
    # shared blocks and tied embeddings stay one tensor in the average
    assert ours.module.encoder_layers[0] is ours.module.encoder_layers[3]
    assert ours.module.src_embed.weight is ours.module.output.weight
    assert not any(p.requires_grad for p in ours.module.parameters())
