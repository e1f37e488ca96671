"""CoSINE single-image editing with SVDiff spectral shifts (docs/editing.md).

Fine-tune shifts on one image and its description, then edit by changing the prompt:

    python examples/single_image_edit.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --image dog.jpg --source_prompt "a photo of a dog" \
      --target_prompt "a photo of a dog wearing a party hat" --target_prompt "a watercolor painting of a dog" \
      --output_dir edits/dog --seed 0

Reuse the fine-tuned shift for new prompts with `--shift edits/dog` (no fine-tuning). Larger structural changes:
`--eta 0.5` or `--slerp_alpha 0.3`. The same options: `svdiff edit ...`; in Python: `svdiff_adapter.editing.edit_image`.
"""

from svdiff_adapter.editing import main, parse_args


if __name__ == "__main__":
    for role, path in main(parse_args()).files.items():
        print(f"{role}: {path}")
