"""Masked-diffusion SFT with complementary priority masking on DeepSpeed."""
