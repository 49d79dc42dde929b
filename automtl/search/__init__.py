"""Step 3 of the pipeline: warm-up → strategy (policy search) → discretize → fine-tune.

The shared machinery (checkpoint/resume, DDP, logging, progress, data streams) lives in
``_run.py`` and its helpers; what happens between warm-up and the discrete policy is a
*strategy*, one file each (``gumbel.py``, ``conflict.py``), registered by name.
"""
from ..config import SearchConfig, parse_budget
from ._data import _Stream
from ._evaluate import evaluate
from ._run import CHECKPOINT_NAME, LOG_NAME, POLICY_NAME, SearchResult, _Search, search
from ._util import _make_optimizer
from ._strategy import Strategy, list_strategies, register_strategy

__all__ = ["search", "evaluate", "SearchConfig", "SearchResult", "parse_budget", "Strategy",
           "register_strategy", "list_strategies"]
