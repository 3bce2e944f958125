"""insightface's margin callables, margin_loss(logits [N, classes], labels [N, 1] with -1
for another shard's class) -> scaled logits, modifying logits in place as insightface does."""

import math

import torch

from facekernels.reference.partial_fc import combined_margin


class CombinedMarginLoss(torch.nn.Module):
    """ArcFace (m1 == 1, m3 == 0) shifts the target angle by m2 without a gradient; m3 > 0
    subtracts m3 from the target cosine (m2 unused); anything else raises."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def forward(self, logits, labels):
        return combined_margin(logits, labels.view(-1), self.s, self.m1, self.m2, self.m3,
                               self.interclass_filtering_threshold)


class ArcFace(torch.nn.Module):
    """s cos(theta + m) with an exact gradient, cos theta - m sin m once theta + m > pi
    (easy_margin: cos theta where cos theta <= 0)."""

    def __init__(self, s=64.0, margin=0.5):
        super().__init__()
        self.scale = s
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.theta, self.sinmm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
        self.easy_margin = False

    def forward(self, logits, labels):
        here = torch.where(labels.view(-1) != -1)[0]
        columns = labels.view(-1)[here]
        cos = logits[here, columns]
        shifted = cos * self.cos_m - (1.0 - cos * cos).sqrt() * self.sin_m
        if self.easy_margin:
            final = torch.where(cos > 0, shifted, cos)
        else:
            final = torch.where(cos > self.theta, shifted, cos - self.sinmm)
        logits[here, columns] = final
        return logits * self.scale


class CosFace(torch.nn.Module):
    def __init__(self, s=64.0, m=0.40):
        super().__init__()
        self.s, self.m = s, m

    def forward(self, logits, labels):
        here = torch.where(labels.view(-1) != -1)[0]
        columns = labels.view(-1)[here]
        logits[here, columns] = logits[here, columns] - self.m
        return logits * self.s
