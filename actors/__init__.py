"""The emulator's actors as plain classes (GPU, NDP units, scheduler), its clock, wire codec and numpy kernels."""
