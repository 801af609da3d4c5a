"""Convert torchvision's ImageNet VGG-16 into a Detectron2 checkpoint of SSD's VGG-16 backbone.

    python tools/convert_vgg16_to_d2.py vgg16-397923af.pth vgg16_ssd_d2.pth

Input: a torchvision ``vgg16`` state dict (download it yourself, e.g. from the address in
``torchvision.models.VGG16_Weights.IMAGENET1K_V1.url``). Output: ``{"model": ...}`` with the
``backbone.*`` names of ``ap_loss_d2.modeling.VGG16SSD`` (fc6/fc7 subsampled to the dilated
convolutions as SSD does), for ``MODEL.WEIGHTS``.
"""
import argparse

from ap_loss_d2.modeling.vgg import convert_vgg16_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="torchvision vgg16 state dict (.pth)")
    p.add_argument("dst", help="Detectron2 checkpoint to write (.pth)")
    args = p.parse_args(argv)
    n = convert_vgg16_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}: {n} tensors of the backbone of APLossSSD (MODEL.WEIGHTS {args.dst})")


if __name__ == "__main__":
    main()
