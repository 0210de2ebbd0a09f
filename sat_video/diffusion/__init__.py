"""Diffusion: the noise schedule, training inputs from the frozen stages, the v-prediction loss, sampling."""
