"""A test-only mixin that blocks one rank for ever inside a forward pass, as a stuck kernel or a dead peer would."""

import os
import time
from dataclasses import dataclass

from sat_video import Mixin, register_mixin


@register_mixin("test_hang_on_rank")
class HangOnRank(Mixin):
    @dataclass
    class Config:
        rank: int = 1
        after_forwards: int = 2
        """Forwards that run normally before the one that never returns."""

    def __init__(self, dit_config, config=None):
        super().__init__(dit_config, config)
        self.forwards = 0

    def add_position(self, hidden, ctx):
        self.forwards += 1
        if self.forwards > self.config.after_forwards and int(os.environ.get("RANK", 0)) == self.config.rank:
            while True:
                time.sleep(1)
        return hidden
