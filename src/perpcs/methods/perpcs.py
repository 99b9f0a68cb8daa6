"""perpcs: the target's assembled recipe (step 5 of the pipeline) applied to the merged model.

Its seconds are the assembly's, recorded with the recipe; its bytes are the recipe file's.
"""

from perpcs.methods import Method, Personalized, register
from perpcs.recipe import Recipe, apply_recipe


@register
class PerPcs(Method):
    name = "perpcs"
    rag_row = "perpcs+rag"
    needs = frozenset({"pool"})

    def personalize(self, user) -> Personalized:
        run = self.ctx.run
        path = run.recipe_path(user.user_id)
        recipe = Recipe.load(path)
        seconds = recipe.seconds if recipe.seconds is not None else \
            run.stats().get("assemble", {}).get("seconds_per_user", {}).get(user.user_id, float("nan"))  # older recipes
        return Personalized(apply_recipe(self.ctx.model, recipe, self.ctx.pool), seconds, path.stat().st_size)
