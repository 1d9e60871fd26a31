"""`python -m benchmarks` (make bench): every benchmark, one after another."""

from benchmarks import bench_gtcc, bench_progress

for bench in (bench_progress, bench_gtcc):
    print(f"\n== {bench.__name__} ==", flush=True)
    bench.main()
