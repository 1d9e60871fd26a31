"""The sweep state: a sweep's spec, its trial queue (create, claim, lease, retry, finish) and the
read-only view of its trials. Both launchers (which run trials) and analysis (which reads them)
import it; it imports neither, and knows no launcher (SLURM job accounting is injected)."""
