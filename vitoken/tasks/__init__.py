"""Tasks chosen by `config.task.name`. Importing this package registers the built-in ones."""
from vitoken.tasks import (  # noqa: F401  (registration side effects)
                                classification,
                                distillation,
                                masked_modeling,
                                runs,
                                tokenizers,
                                videomae,
                                violet,
                                visual_qa,
)
from vitoken.tasks.base import (
                                RESERVED_FIELDS,
                                Progress,
                                Task,
                                build,
                                model_inputs,
                                model_rngs,
                                register,
                                registered_tasks,
                                vit_from_config,
)
