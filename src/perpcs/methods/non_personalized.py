"""non_personalized: the merged task-adapted model alone; its +rag row, `rag`, adds BM25 retrieval
of the user's own history items to the prompt, with no user parameters."""

from perpcs.methods import Method, Personalized, register


@register
class NonPersonalized(Method):
    name = "non_personalized"
    rag_row = "rag"

    def personalize(self, user) -> Personalized:
        return Personalized(self.ctx.model)
