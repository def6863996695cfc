"""Token reducers. Importing this package registers every built-in method.

The API (`TokenState`, `Reducer`, `BlockInfo`, `build_plan`, ...) is `base`'s, re-exported here;
it lives in `token_state`, `contract` and `plan`.
"""
from vitoken.models.reducers import (  # noqa: F401  (registration side effects)
  compression,
  identity,
  lookup,
  masking,
  pruning,
  tempme,
  testa,
  token_learner,
  tome,
)
from vitoken.models.reducers.base import *  # noqa: F401,F403  pylint: disable=wildcard-import
