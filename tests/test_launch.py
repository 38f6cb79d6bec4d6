"""Processes that a launcher started but that would not train as one group are refused in one line."""

from vlm_tune.launch import cpu_group, launch_problem, launched_world_size


def test_a_launch_of_several_processes_is_read_from_the_environment():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == 2
    assert launched_world_size({"PMI_SIZE": "4"}) == 4  # mpirun
    assert cpu_group(cuda_available=False, env={"WORLD_SIZE": "2"})  # torchrun on a CPU machine: gloo
    assert not cpu_group(cuda_available=True, env={"WORLD_SIZE": "2"})  # GPUs: accelerate picks NCCL itself
    assert not cpu_group(cuda_available=False, env={})


def test_processes_that_do_not_form_a_group_are_refused():
    assert launch_problem(2, {"WORLD_SIZE": "2"}) is None
    assert launch_problem(1, {}) is None
    assert launch_problem(1, {"ACCELERATE_USE_CPU": "True"}) is None  # accelerate launch --cpu, one process
    apart = launch_problem(1, {"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert apart.startswith("2 processes were started (WORLD_SIZE=2) but they formed a group of 1")
    assert "torchrun --standalone --nproc_per_node N -m vlm_tune.train" in apart and "\n" not in apart
    one_of_n = launch_problem(1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert one_of_n.startswith("`accelerate launch --cpu --num_processes N` started one process, not N")
