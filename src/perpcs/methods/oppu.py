"""oppu: One PEFT Per User, a LoRA trained on the target's own history with the sharers' settings and
budget (`user_lora`): the quality reference, and the one method that trains per target."""

from perpcs.lora import load_or_train
from perpcs.methods import Method, Personalized, register
from perpcs.user_lora import oppu_dir, train_user_lora
from perpcs.utils import dir_bytes


@register
class Oppu(Method):
    name = "oppu"
    rag_row = "oppu+rag"
    trains_per_target = True

    def personalize(self, user) -> Personalized:
        run = self.ctx.run
        folder = oppu_dir(run, user.user_id, self.ctx.settings.history_k)
        peft_model, stats = load_or_train(self.ctx.model, folder,
                                          lambda: train_user_lora(run, user, desc=f"oppu {user.user_id}"))
        return Personalized(peft_model.eval(), stats["seconds"], dir_bytes(folder / "adapter"))
