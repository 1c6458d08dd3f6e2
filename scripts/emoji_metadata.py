"""emoji.json of emoji-datasource-google -> skytrain's metadata table (JSON Lines).

One row per Google image (base emoji and each skin-tone variation): id, image path, a caption built
from the emoji's name, subcategory and category, the images' licence (Apache-2.0, per the package
README) and attribution.
"""
import json
import os
import sys

TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


def caption(e, tone=None):
    name = (e.get("name") or e["short_name"]).lower()
    sub = e["subcategory"].replace("-", " ")
    text = f"an emoji of {name}"
    if tone:
        tones = [TONES.get(t, t) for t in tone.split("-")]
        text += f" with {' and '.join(dict.fromkeys(tones))} skin tone"
    return f"{text}, {sub}, {e['category'].lower()}"


def main(package, out, version):
    emoji = json.load(open(f"{package}/emoji.json"))
    rows = []
    for e in emoji:
        variants = [(None, e)] + sorted((e.get("skin_variations") or {}).items())
        for tone, v in variants:
            if not v.get("has_img_google"):
                continue
            rows.append({
                "id": v["unified"].lower(),
                "image": f"package/img/google/64/{v['image']}",
                "caption": caption(e, tone),
                "licence": "Apache-2.0",
                "author": "Google (Noto Emoji project)",
                "source": f"https://www.npmjs.com/package/emoji-datasource-google/v/{version} img/google/64/{v['image']}",
            })
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    os.replace(tmp, out)
    print(f"{len(rows)} emoji rows -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
