"""The mask-diffusion sampler (LLaDA, Dream): settings.py (knobs, no torch), decide.py (one step's decisions),
engine.py (MaskDiffusionSampler: continuous batching, block KV caching). Import from the submodules: this
package stays free of torch so that config validation does not load it."""
