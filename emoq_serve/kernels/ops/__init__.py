"""Raw Triton kernels. Importing anything here imports triton; only the dispatcher does, lazily."""
