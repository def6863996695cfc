"""Token reducers. Importing this package registers every built-in method."""
from vitoken.models.reducers import identity, tome  # noqa: F401  (registration side effects)
from vitoken.models.reducers.base import (BlockInfo, POST_ATTN, POST_BLOCK, PRE_BLOCK, Reducer,
                                          ReductionPlan, TokenState, build_plan, register,
                                          registered_methods)
