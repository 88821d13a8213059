"""Expert-parallel MoE dispatch/combine for JAX over libfabric (AWS EFA) and NVLink."""
