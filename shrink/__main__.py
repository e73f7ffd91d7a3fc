"""`python -m shrink ARGS` is the `shrink` command; under `torchrun --nproc_per_node N -m shrink
OVERRIDES` (WORLD_SIZE set) every rank joins the job (shrink/launch.py)."""
import os

if __name__ == "__main__":
    if "WORLD_SIZE" in os.environ:
        from shrink.launch import main
    else:
        from shrink.cli import main
    main()
