"""Generation and benchmark evaluation (HumanEval, MBPP, GSM8K, MATH-500) of diffusion LMs."""
