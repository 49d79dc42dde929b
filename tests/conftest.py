import pytest
import torch

from automtl.tasks import Task

torch.manual_seed(0)


@pytest.fixture
def dense_tasks():
    """The three dense tasks of the synthetic scenes."""
    return [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]


@pytest.fixture
def mixed_tasks():
    """A dense, a global and a custom-headed task together."""
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    return [
        Task("segment", "segmentation", classes=3),
        Task("label", "classification", classes=5),
        Task("score", "regression", classes=2),
    ]
