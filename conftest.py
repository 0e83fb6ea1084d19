"""Test-suite settings: one torch thread. The zoo's models are tiny, so threads only add
scheduling noise, and CI's two cores are shared by the test process and its workers."""

import torch

torch.set_num_threads(1)
