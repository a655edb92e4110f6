# Sugar over the scripts README names.
.PHONY: install demo test bench
install:
	bash scripts/install.sh
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench: install
	.venv/bin/python benchmarks/data_throughput.py --out bench_out/data.jsonl
