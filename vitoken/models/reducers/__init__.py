"""Token reducers. Importing this package registers every built-in method."""
from vitoken.models.reducers import (identity, lookup, masking, pruning, token_learner,  # noqa: F401  (registration side effects)
                                     tome)
from vitoken.models.reducers.base import (BlockInfo, EMBED_LAYER, LEARNED_ID, ModelContext,
                                          POST_ATTN, POST_BLOCK, PRE_BLOCK, PRE_POSEMB, Reducer,
                                          ReductionPlan, TokenState, build_plan, checked_gathers,
                                          register, registered_methods, run_checked)
