"""DreamBooth-style training of SVDiff spectral shifts (flags follow diffusers' examples/dreambooth/train_dreambooth.py).

Single subject, with prior preservation:

    accelerate launch examples/train_dreambooth_svdiff.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \
      --with_prior_preservation --class_data_dir class-dog --class_prompt "a photo of dog" \
      --resolution 512 --train_batch_size 1 --max_train_steps 500 --output_dir svdiff-dog

Several subjects with Cut-Mix-Unmix: repeat `--subject "dir=dog,prompt=a photo of sks dog,class=dog"` and add
`--unmix_weight 0.1`. All options: docs/training.md. The loop itself is `svdiff_adapter.training.train`.
"""

from svdiff_adapter.training import main, parse_args


if __name__ == "__main__":
    main(parse_args())
