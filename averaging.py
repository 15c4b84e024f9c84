"""--ema_decay: an exponential moving average of the model's weights (Marian's exponential smoothing), which
evaluation, best.pt and last.pt use, while the optimizer goes on training the weights themselves."""
import copy

import torch


class WeightAverage:
    """average <- d x average + (1 - d) x weights after every step, starting from the first step's, where
    d = min(decay, (1 + n) / (10 + n)) after n updates (the warm-up of TensorFlow's ExponentialMovingAverage):
    early on the average follows the weights closely, so a run of a few hundred steps (large batches) is not
    evaluated on an average of mostly untrained weights.

    torch.optim.swa_utils.AveragedModel with the same averaging function computes the same numbers (a test
    compares them), but reads its step count on the host and copies it to the device at every step,
    which on CUDA waits for the GPU; here the count is a Python int and one fused lerp over all the weights
    updates the average, queued like any other kernel."""

    def __init__(self, model, decay):
        # deepcopy keeps shared blocks and tied embeddings shared: one average per distinct tensor
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.averaged = list(self.module.parameters())  # loading a state dict copies into these very tensors
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model):
        weights = list(model.parameters())
        if self.updates == 0:
            for average, weight in zip(self.averaged, weights):
                average.copy_(weight)
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_(self.averaged, weights, 1 - decay)
        self.updates += 1
