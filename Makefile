# Quick start targets. Each one installs what it needs first, so both work on a fresh machine.
PYTHON ?= python3
# torch 2.14.1 + torchvision 0.29.1: the pair whose wheels match here (torchvision is needed by the
# Idefics3 and Qwen-VL image processors). On your own GPU machine, install the torch you use instead.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-run demo-vqa test test-floor lint

install:
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e '.[test]'

demo: install demo-run
	$(PYTHON) -m vlm_tune.export $(RUN) --out $(RUN)/export-merged --merge --overwrite
	$(PYTHON) scripts/plain_transformers_caption.py $(RUN)/export-merged data/shapes/images/test_00000.png data/shapes/images/test_00001.png

# The demo's commands: train (a second run starts over in RUN), then caption `test` and `test_novel`
# (held-out colour-kind pairs) with the base model and the trained one, and compare (printed and written).
# RUN and SEED pick the run folder and train.seed; benchmarks/demo_seeds.py runs these same lines per seed.
RUN ?= runs/demo
SEED ?= 0
EVALUATE = $(PYTHON) -m vlm_tune.evaluate --no-progress --overwrite
demo-run:
	$(PYTHON) -m vlm_tune.train recipes/demo.yaml train.output_dir=$(RUN) train.seed=$(SEED) train.overwrite=true
	$(EVALUATE) recipes/demo.yaml --split test --output-dir $(RUN)/eval-base-test
	$(EVALUATE) recipes/demo.yaml --split test_novel --output-dir $(RUN)/eval-base-test_novel
	$(EVALUATE) --checkpoint $(RUN) --split test --output-dir $(RUN)/eval-trained-test
	$(EVALUATE) --checkpoint $(RUN) --split test_novel --output-dir $(RUN)/eval-trained-test_novel
	$(EVALUATE) --compare $(RUN)/eval-base-test $(RUN)/eval-trained-test --out $(RUN)/compare-test.md
	$(EVALUATE) --compare $(RUN)/eval-base-test_novel $(RUN)/eval-trained-test_novel --out $(RUN)/compare-test_novel.md

demo-vqa: install
	$(PYTHON) -m vlm_tune.train recipes/demo_vqa.yaml train.overwrite=true
	$(PYTHON) -m vlm_tune.evaluate recipes/demo_vqa.yaml --output-dir runs/demo_vqa/eval-base --overwrite
	$(PYTHON) -m vlm_tune.evaluate --checkpoint runs/demo_vqa --output-dir runs/demo_vqa/eval-trained --overwrite
	$(PYTHON) -m vlm_tune.evaluate --compare runs/demo_vqa/eval-base runs/demo_vqa/eval-trained --out runs/demo_vqa/compare.md

lint:
	$(PYTHON) -m ruff check vlm_tune tests benchmarks scripts
	$(PYTHON) -m ruff format --check vlm_tune tests benchmarks scripts

test: install lint
	$(PYTHON) -m pytest -q --timeout 900

# The suite on the oldest transformers we support (5.17), laid over the installed one; not part of `make test`.
FLOOR ?= /tmp/vlm_tune-transformers-5.17
test-floor: install
	$(PYTHON) -m pip install -q --no-deps --target $(FLOOR) transformers==5.17.0 'huggingface-hub>=1.5,<2'
	$(PYTHON) -m pip install -q --target $(FLOOR) httpx
	PYTHONPATH=$(FLOOR) $(PYTHON) -c 'import transformers; assert transformers.__version__ == "5.17.0"'
	PYTHONPATH=$(FLOOR) $(PYTHON) -m pytest -q --timeout 900 -p no:cacheprovider $(TESTS)
