"""vLLM's OpenAI server (`vllm.entrypoints.openai.api_server`, arguments as given), its engine core process
forked rather than spawned when the model runs in one process (tensor parallel size 1).

vLLM's CPU platform always sets VLLM_WORKER_MULTIPROC_METHOD=spawn (vllm/platforms/cpu.py,
`check_and_update_config`), so the engine core process imported torch and vLLM a second time: about 7 s of
every start on this image (measured: ready in 13 s forked, 20.7 s spawned). Spawning is needed there for
worker processes of a multi-process executor (NUMA binding, OpenMP threads after fork); with one process
("uni" executor, serve.sh) the API server has run no OpenMP region when it starts the engine core, and vLLM's
GPU platforms fork in the same place. A tensor parallel size above 1 keeps vLLM's spawn.
"""

import os
import runpy
import sys

from vllm.platforms import cpu

_check_and_update_config = cpu.CpuPlatform.check_and_update_config.__func__


def check_and_update_config(cls, vllm_config):
    _check_and_update_config(cls, vllm_config)
    if vllm_config.parallel_config.world_size == 1:
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"


cpu.CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
sys.argv[0] = "vllm.entrypoints.openai.api_server"
runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
