"""The model: the hook catalogue, hook composition, the bare transformer, the DiT, the frozen-stage catalogue,
the registries, and the builder that turns config sections into a model with its mixins and stages."""
