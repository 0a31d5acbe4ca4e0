"""monailabel-medgemma's engine (see the README for a request's way through it).

Importing the package sets the process's malloc policy (:func:`allocator.keep_freed_memory`) before any thread
of the caller's is made: a thread that already has an arena of its own keeps it, and its image-sized arrays are
then mapped afresh every time (a benchmark's threads made before its reader had the 134-slice CT's maps page
fault 100,000-145,000 times a reading in steady state, none with the policy set at import: ``cpu_maps.md``).
``MEDGEMMA_MALLOC=system`` leaves glibc's own policy."""

from . import allocator

allocator.keep_freed_memory()
