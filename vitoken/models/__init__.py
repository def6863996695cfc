"""Model definitions: the ViT backbone, its attention, and the token reducers."""
from vitoken.models.variants import decode_variant
from vitoken.models.vit import Model, VisionTransformer
