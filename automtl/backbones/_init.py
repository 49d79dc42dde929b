"""torchvision's default initialisation, shared by the builtin families so a fresh model starts from the same distribution."""
from torch import nn


def torchvision_init(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU gain) convolutions with zero bias; BatchNorm at weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
