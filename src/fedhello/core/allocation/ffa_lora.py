"""``ffa-lora``: FFA-LoRA (Sun et al., ICLR 2024) on FedRA's allocation: A frozen at its shared
initialisation, only B trained and averaged.

With every client's A equal, the average of the uploaded B's times that A is exactly the
average of the clients' updates ``B_k A`` (plain LoRA averages B and A separately, and the
product of averages is not the average of products). Freezing A is a switch of every strategy
(``lora.freeze-a = true``); this row is FedRA's random per-round layer draw with it on, so it
compares with ``fedra`` at the same layer budgets (each client trains half of those layers'
LoRA parameters: B only).
"""

from __future__ import annotations

from fedhello.core.allocation.base import register
from fedhello.core.allocation.fedra import FedRAAllocation


@register
class FFALoRAAllocation(FedRAAllocation):
    name = "ffa-lora"
    freezes_a = True

    def configure_adapter(self, max_rank: int, freeze_a: bool = False) -> None:
        del freeze_a  # FFA-LoRA is A frozen, whatever lora.freeze-a says
        super().configure_adapter(max_rank, freeze_a=True)
