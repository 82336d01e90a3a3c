# XLA flags for NVIDIA GPU training, sourced by launch/slurm.sbatch and tools/gpu_check.py
# (which runs with them, so a flag the installed XLA lacks shows up there first). They follow
# the GPU recipes of MaxText and NVIDIA's JAX-Toolbox (rosetta/docs/GPU_performance.md):
#   latency_hiding_scheduler   overlap collectives (FSDP all-gathers, gradient reduce-scatters)
#                              with compute instead of running them back to back
#   pipelined_*                start the next layer's all-gather / previous layer's
#                              reduce-scatter inside the layer loop
#   while_loop_double_buffering  the same across scanned layers and micro-batches
#   *_combine_threshold_bytes  batch small collectives into ~1 GB (all-reduce) / per-device
#                              shares (all-gather, reduce-scatter) messages
#   command_buffer=            no CUDA graphs (they pin memory and gain little for big steps)
# Anything already in XLA_FLAGS comes after these and so wins.
MMJAX_XLA_GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true
 --xla_gpu_enable_command_buffer=
 --xla_gpu_all_reduce_combine_threshold_bytes=1073741824
 --xla_gpu_all_gather_combine_threshold_bytes=134217728
 --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
 --xla_gpu_enable_pipelined_all_gather=true
 --xla_gpu_enable_pipelined_reduce_scatter=true
 --xla_gpu_enable_pipelined_all_reduce=true
 --xla_gpu_enable_while_loop_double_buffering=true"
export XLA_FLAGS="$(echo $MMJAX_XLA_GPU_FLAGS) ${XLA_FLAGS:-}"
