#!/bin/sh
# The CPU engine's entrypoint: vLLM's OpenAI server (serve.py) in eager mode (no torch.compile on CPU), with the
# arguments LLMHub passes (llmhub/fleet/vllm_command.py).
#
# With a tensor parallel size of 1 the model runs inside vLLM's engine core process ("uni" executor)
# rather than in a worker process of its own: one Python process (and one torch import, ~6 s) less at
# every start. vLLM's CPU platform forces the multiprocess executor unless
# VLLM_ENABLE_V1_MULTIPROCESSING=0 (set in the Dockerfile); the API server still runs the engine core in
# its own process. A tensor parallel size above 1 keeps vLLM's multiprocess executor.
tp=1
previous=
for arg in "$@"; do
    case "$previous" in --tensor-parallel-size|-tp) tp="$arg" ;; esac
    case "$arg" in --tensor-parallel-size=*) tp="${arg#*=}" ;; esac
    previous="$arg"
done
if [ "$tp" = "1" ]; then
    set -- "$@" --distributed-executor-backend uni
fi
exec python /opt/llmhub/serve.py --enforce-eager "$@"  # vLLM's OpenAI server (serve.py: fork at TP 1)
