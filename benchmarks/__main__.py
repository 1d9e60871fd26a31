"""`python -m benchmarks` (make bench): every benchmark, one after another."""

from benchmarks import bench_gtcc, bench_progress, bench_sweep, bench_video, bench_video_data

for bench in (bench_progress, bench_gtcc, bench_video):
    print(f"\n== {bench.__name__} ==", flush=True)
    bench.main()
print(
    "\n== benchmarks.bench_sweep (quick; `python -m benchmarks.bench_sweep` for pruning too) ==", flush=True
)
bench_sweep.main(["--quick"])
print(
    "\n== benchmarks.bench_video_data (quick; `python -m benchmarks.bench_video_data` for more videos) ==",
    flush=True,
)
bench_video_data.main(["--scale", "1", "--pairs", "256"])
