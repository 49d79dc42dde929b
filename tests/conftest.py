import pytest
import torch

from automtl.tasks import Task

# Tests use small tensors: one thread is as fast, and immune to oversubscription when
# other jobs share the cores (two spinning OpenMP pools on two cores can be 100x slower).
torch.set_num_threads(1)
torch.manual_seed(0)


@pytest.fixture
def dense_tasks():
    """The three dense tasks of the synthetic scenes."""
    return [Task("segment", "segmentation", classes=4), Task("depth", "depth"), Task("normal", "normal")]

