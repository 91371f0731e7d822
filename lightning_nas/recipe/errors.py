"""The recipe errors under their former import path.

They live in :mod:`lightning_nas.errors`, at the bottom of the layers, because the component
registry (which the recipe validator uses) raises them too. Import from there; this name stays so
that code written against ``lightning_nas.recipe.errors`` keeps working.
"""

from ..errors import USAGE_EXIT_CODE, RecipeError, close_match, short_repr

__all__ = ["USAGE_EXIT_CODE", "RecipeError", "close_match", "short_repr"]
