"""docling's side of P15, run by docling's own interpreter (it imports docling and the standard library only).

    python bench/docling_side.py ARTIFACTS SOURCE MAX_NEW_TOKENS SCALE

Converts SOURCE (a PDF, or an image) with docling's VlmPipeline and its SmolDocling-through-transformers preset,
offline, the model read from ARTIFACTS/docling-project--SmolDocling-256M-preview, float32 on the CPU, greedy,
at page scale SCALE (docling's default is 2.0). The pipeline is built before the clock starts. Prints one JSON
line: status, seconds (the conversion alone), pages, each page's raw DocTags (`texts`).
"""

import json
import sys
import time
from pathlib import Path


def main() -> int:
    art, source, tokens, scale = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    from docling.datamodel import vlm_model_specs
    from docling.datamodel.accelerator_options import AcceleratorOptions
    from docling.datamodel.base_models import InputFormat
    from docling.datamodel.pipeline_options import VlmPipelineOptions
    from docling.document_converter import DocumentConverter, ImageFormatOption, PdfFormatOption
    from docling.pipeline.vlm_pipeline import VlmPipeline

    vlm = vlm_model_specs.SMOLDOCLING_TRANSFORMERS.model_copy(
        update={"max_new_tokens": tokens, "torch_dtype": "float32", "scale": scale})
    options = VlmPipelineOptions(vlm_options=vlm, artifacts_path=Path(art),
                                 accelerator_options=AcceleratorOptions(device="cpu"))
    kind = InputFormat.PDF if source.lower().endswith(".pdf") else InputFormat.IMAGE
    wrap = PdfFormatOption if kind == InputFormat.PDF else ImageFormatOption
    converter = DocumentConverter(format_options={kind: wrap(pipeline_cls=VlmPipeline, pipeline_options=options)})
    converter.initialize_pipeline(kind)  # the model loads here, before the clock
    t0 = time.perf_counter()
    result = converter.convert(source, raises_on_error=False)
    seconds = time.perf_counter() - t0
    texts = [p.predictions.vlm_response.text if p.predictions.vlm_response else None for p in result.pages]
    print(json.dumps({"status": str(result.status), "seconds": seconds, "pages": len(result.pages), "texts": texts,
                      "errors": [str(e) for e in result.errors][:3]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
