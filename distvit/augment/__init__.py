"""Training augmentation on the training device: a recipe of switchable parts (`recipe`), each step's
per-sample random choices drawn from the step's seed (`params`), and the batched image operations
(`ops`, `randaugment`) that apply them, uint8 at stored size in, normalised floats at model size out."""

from distvit.augment.params import AugmentParams
from distvit.augment.pipeline import Augmenter
from distvit.augment.recipe import PRESETS, Recipe, recipe_of

__all__ = ["PRESETS", "AugmentParams", "Augmenter", "Recipe", "recipe_of"]
