"""The token-reduction API in one namespace (`from vitoken.models.reducers import base`).

It lives in three modules, re-exported here unchanged:
- `token_state`: `TokenState`, the token sequence a block and its reducers pass along, and
  the batched token gather (`take_tokens`, `checked_gathers`, `run_checked`);
- `contract`: what a reducer is and sees (`Reducer`, `BlockInfo`, `ModelContext`, the stage
  and block-information constants) and the method registry (`register`, `registered_reducer`);
- `plan`: a config's entries placed per layer (`build_plan` -> `ReductionPlan`).
"""
# pylint: disable=unused-import
from vitoken.models.patches import PatchGrid  # noqa: F401
from vitoken.models.reducers.contract import (  # noqa: F401
                                              BLOCK_MERGE,
                                              BLOCK_NEEDS,
                                              BLOCK_OWNER,
                                              BLOCK_STAGES,
                                              CLS_ATTN,
                                              EMBED_LAYER,
                                              KEYS_MEAN,
                                              POST_ATTN,
                                              POST_BLOCK,
                                              PRE_BLOCK,
                                              PRE_POSEMB,
                                              STAGES,
                                              BlockInfo,
                                              ModelContext,
                                              Reducer,
                                              register,
                                              registered_methods,
                                              registered_reducer,
                                              run_reducer,
)
from vitoken.models.reducers.plan import PlannedReducer, ReductionPlan, build_plan  # noqa: F401
from vitoken.models.reducers.token_state import (  # noqa: F401
                                              _DEBUG,
                                              EMPTY_GRID,
                                              LEARNED_ID,
                                              MERGE_MODES,
                                              TokenState,
                                              checked_gathers,
                                              run_checked,
                                              take_tokens,
)

__all__ = [
    "BLOCK_MERGE", "BLOCK_NEEDS", "BLOCK_OWNER", "BLOCK_STAGES", "CLS_ATTN", "EMBED_LAYER",
    "KEYS_MEAN", "POST_ATTN", "POST_BLOCK", "PRE_BLOCK", "PRE_POSEMB", "STAGES", "BlockInfo",
    "ModelContext", "Reducer", "register", "registered_methods", "registered_reducer", "run_reducer",
    "PlannedReducer", "ReductionPlan", "build_plan", "EMPTY_GRID", "LEARNED_ID", "MERGE_MODES",
    "TokenState", "checked_gathers", "run_checked", "take_tokens", "PatchGrid",
]
