"""`easel inspect report`: one offline HTML page that tells how Stable Diffusion made THIS image, every figure
drawn from one run by the existing inspect figure functions (no external URLs, no JavaScript)."""
from __future__ import annotations

import html
from pathlib import Path

# The page's order is the story's: from the prompt to the image, then how the UNet was trained, then CLIP.
SECTIONS = ("prompt", "tokens", "embeddings", "steps", "attention", "decode", "image", "judge", "noise", "clip")

CAPTIONS = {
    "en": {
        "title": "How this image was made",
        "prompt": ("The prompt", "Everything starts from this text and these settings."),
        "tokens": ("Tokens", "The tokenizer cuts the prompt into BPE pieces and fills 77 slots: a start token, the "
                   "pieces (with their emphasis weights) and end/padding tokens."),
        "embeddings": ("Embeddings", "The text encoder turns each slot into a vector. Left: the slots and the length "
                       "of their vectors; right: the vectors on their first two principal components."),
        "steps": ("The UNet's steps", "Sampling starts from pure noise. At each step the UNet predicts the noise; "
                  "columns are steps, rows show the noisy latent, its preview, the predicted clean image (x0) and "
                  "the predicted noise."),
        "guidance": ("Classifier-free guidance", "Per step: the prediction without the prompt, with it, and the "
                     "guided mix that moves away from the first towards the second."),
        "schedule": ("Noise levels", "The noise level (sigma) the sampler steps through, from high to low."),
        "attention": ("Cross-attention per word", "Where in the image each word of the prompt was looked at, "
                      "summed over steps and layers: brighter means more attention."),
        "decode": ("VAE decode", "The UNet works on a small latent (its channels, left); the VAE decoder turns the "
                   "final latent into pixels (right)."),
        "image": ("The image", "The result, saved with the parameters that reproduce it."),
        "judge": ("Did it follow the prompt?", "The ShapeWorld judge finds the objects in the image and checks the "
                  "prompt word by word. Each word's attention map is framed green if the image follows it, red if "
                  "not."),
        "noise": ("Forward diffusion: how it was trained", "Training adds noise to an image's latent at random "
                  "timesteps and teaches the UNet to predict that noise. This row noises this image's latent from "
                  "timestep 0 to the last."),
        "noise_schedule": ("The training noise schedule", "How much signal is left at each timestep (alphas_cumprod, "
                           "SNR) and the matching sigmas."),
        "clip": ("CLIP", "The text encoder comes from CLIP, trained so that matching captions and images lie close "
                 "together. Similarity of captions, their paraphrases and hard negatives (brighter is closer)."),
        "clip_images": ("CLIP", "The text encoder comes from CLIP, trained so that matching images and captions lie "
                        "close together and mismatched ones apart. Rows: images; columns: their captions and hard "
                        "negatives (colours or shapes swapped, relation flipped, count changed); brighter is closer."),
        "nearest": ("Nearest captions", "The captions CLIP puts closest to each image (green: the image's own)."),
        "passed": "The judge: the image follows the prompt.",
        "failed": "The judge: the image does not follow the prompt",
        "seen": "Objects found",
        "footer": "Made by easel inspect report. Every figure was drawn from this run.",
    },
    "zh": {
        "title": "这张图像是如何生成的",
        "prompt": ("提示词", "一切都从这段文字和这些设置开始。"),
        "tokens": ("词元", "分词器把提示词切成 BPE 片段，填满 77 个位置：起始词元、各片段（及其强调权重）和结束/填充词元。"),
        "embeddings": ("嵌入向量", "文本编码器把每个位置变成一个向量。左：各位置及其向量长度；右：向量在前两个主成分上的投影。"),
        "steps": ("UNet 的去噪步骤", "采样从纯噪声开始。每一步 UNet 预测噪声；每列是一步，各行依次是带噪潜变量、它的预览、"
                  "预测的干净图像（x0）和预测的噪声。"),
        "guidance": ("无分类器引导", "每一步：不带提示词的预测、带提示词的预测，以及远离前者、靠近后者的引导结果。"),
        "schedule": ("噪声水平", "采样器依次经过的噪声水平（sigma），从高到低。"),
        "attention": ("逐词交叉注意力", "提示词中每个词在图像的哪些位置被关注（对所有步骤和层求和）：越亮表示注意力越多。"),
        "decode": ("VAE 解码", "UNet 在一个小的潜变量上工作（左为其各通道）；VAE 解码器把最终潜变量变成像素（右）。"),
        "image": ("生成的图像", "最终结果，保存时附带了可复现它的参数。"),
        "noise": ("前向扩散：模型是如何训练的", "训练时在图像的潜变量上按随机时间步加噪，让 UNet 学会预测这些噪声。"
                  "这一行把本图像的潜变量从第 0 个时间步加噪到最后一个。"),
        "noise_schedule": ("训练噪声调度", "每个时间步剩余多少信号（alphas_cumprod、信噪比）以及对应的 sigma。"),
        "clip": ("CLIP", "文本编码器来自 CLIP，它被训练成让匹配的文字和图像彼此靠近。图中是描述、其改写和困难负例之间的相似度"
                 "（越亮越接近）。"),
        "clip_images": ("CLIP", "文本编码器来自 CLIP，它被训练成让匹配的图像和文字彼此靠近、不匹配的彼此远离。行：图像；列：它们的描述"
                        "和困难负例（颜色或形状互换、关系颠倒、数量改变）；越亮越接近。"),
        "nearest": ("最接近的描述", "CLIP 认为与每张图像最接近的描述（绿色：图像自己的描述）。"),
        "judge": ("图像是否遵循了提示词？", "ShapeWorld 评判器找出图像中的物体，逐词检查提示词。图像遵循了的词，其注意力图加绿框；"
                  "没有遵循的加红框。"),
        "passed": "评判结果：图像遵循了提示词。",
        "failed": "评判结果：图像没有遵循提示词",
        "seen": "找到的物体",
        "footer": "由 easel inspect report 生成。所有图都来自这一次运行。",
    },
}

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
figure{margin:0.8em 0}img{max-width:100%;height:auto;border:1px solid #eee}img.small{image-rendering:pixelated}
p.caption{color:#444;margin:0.3em 0}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}
dl{display:grid;grid-template-columns:max-content auto;gap:0.2em 1em}
dt{font-weight:bold}footer{margin-top:2em;color:#777}
.words{display:flex;flex-wrap:wrap;gap:0.8em}.word{width:200px}.word img{border:4px solid;width:100%}
.ok img{border-color:#1a7f37}.miss img{border-color:#c62828}.word p{margin:0.2em 0;font-size:0.85em}
.ok b{color:#1a7f37}.miss b{color:#c62828}"""


def captions(lang: str) -> dict:
    """The caption strings of a language; errors list the choices."""
    if lang not in CAPTIONS:
        raise ValueError(f"--lang must be one of {', '.join(CAPTIONS)} (got {lang!r})")
    return CAPTIONS[lang]


def figure(src: str, alt: str, width: int | None = None) -> str:
    """An <img> of a file in the page's folder, referenced relatively; `width` enlarges a small image (pixelated)."""
    size = f' class="small" width="{width}"' if width else ""
    return f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt)}"{size}></figure>'


def section(key: str, text: dict, body: str, head: str | None = None) -> str:
    """One <section id=key>: heading, caption, body."""
    title, caption = text[head or key]
    return (f'<section id="{key}"><h2>{html.escape(title)}</h2><p class="caption">{html.escape(caption)}</p>'
            f"{body}</section>")


def sub(key: str, text: dict, body: str) -> str:
    """A captioned figure inside a section (no section id of its own)."""
    title, caption = text[key]
    return f"<h3>{html.escape(title)}</h3><p class=\"caption\">{html.escape(caption)}</p>{body}"


def page(text: dict, lang: str, sections: list[str]) -> str:
    """The whole HTML document: inline CSS, no scripts, no external URLs."""
    return (f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{html.escape(text["title"])}'
            f'</title><style>{STYLE}</style></head><body><h1>{html.escape(text["title"])}</h1>'
            + "\n".join(sections) + f"<footer>{html.escape(text['footer'])}</footer></body></html>\n")


def params_list(params: dict) -> str:
    """The generation parameters as a definition list."""
    rows = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in params.items()
                   if v not in (None, "", [], {}))
    return f"<dl>{rows}</dl>"


def write_report(args) -> Path:
    """Generate once with a Capture, draw every figure from that run into args.out, write index.html; its path."""
    from easel.files import save_image
    from easel.inspect import run as icli
    from easel.inspect import steps as st
    from easel.inspect.attention import capture_maps, write_attention
    from easel.inspect.tokens import format_table, prompt_slots, token_table, tokens_figure
    from easel.pipelines.common import embedding_library
    text = captions(args.lang)
    pipe, req, result, cap = icli.captured_run(args)  # ONE generation: steps and attention both come from it
    out = Path(args.out)
    icli.save_result(out, result)
    library = embedding_library(pipe.loaded)
    first = icli.first_text(req.prompt, req.steps)
    parts = [section("prompt", text, f"<pre>{html.escape(req.prompt)}</pre>" + params_list(result.params))]
    rows = token_table(pipe.loaded, first, req.clip_skip, library)
    per_chunk = min(e.max_position_embeddings for e in pipe.config.text_encoders)
    parts.append(section("tokens", text, f"<pre>{html.escape(format_table(rows, per_chunk))}</pre>"))
    save_image(tokens_figure(pipe.loaded, first, req.clip_skip, library), out / "tokens.png")
    parts.append(section("embeddings", text, figure("tokens.png", text["embeddings"][0])))
    parts.append(steps_section(out, text, pipe, cap, result))
    attention, word_files = attention_section(out, text, pipe, cap, result, library, capture_maps, write_attention,
                                              prompt_slots)
    parts.append(attention)
    parts.append(decode_section(out, text, st.StepPictures(pipe.loaded), cap))
    parts.append(section("image", text, figure("image.png", text["image"][0], width=max(256, result.image.width))))
    if is_builtin(pipe.loaded):
        parts.append(judge_section(text, first, result.image, word_files))
    parts.append(noise_section(out, text, pipe, result, max(req.seed, 0)))
    parts.append(clip_section(out, text, pipe, max(req.seed, 0)))
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")  # never a half-written page
    tmp.write_text(page(text, args.lang, parts), encoding="utf-8")
    tmp.replace(index)
    return index


def _runs(cap) -> list:
    """The captured runs that have steps (the base pass first)."""
    return [r for r in cap.runs if r.steps]


def steps_section(out: Path, text: dict, pipe, cap, result) -> str:
    """The film strip, the guidance strip and the sigma schedule of the first pass."""
    from easel.files import save_image
    from easel.inspect import steps as st
    run = _runs(cap)[0]
    pics = st.StepPictures(pipe.loaded)
    save_image(st.film_strip(pics, run, 8), out / "steps.png")
    body = figure("steps.png", text["steps"][0])
    cfg = st.cfg_strip(pics, run, 8)
    if cfg is not None:
        save_image(cfg, out / "cfg.png")
        body += sub("guidance", text, figure("cfg.png", text["guidance"][0]))
    label = f"{result.params.get('sampler')}, {result.params.get('scheduler')}"
    save_image(st.schedule_plot({label: [s.sigma for s in run.steps]}, f"sigma per step, log scale ({label})"),
               out / "schedule.png")
    body += sub("schedule", text, figure("schedule.png", text["schedule"][0]))
    return section("steps", text, body)


def attention_section(out: Path, text: dict, pipe, cap, result, library, capture_maps, write_attention,
                      prompt_slots) -> tuple[str, list[Path]]:
    """The per-word cross-attention overlays of the text used longest (attention.png), and each word's own
    overlay file (words/NN-word.png, in the prompt's order)."""
    from easel.inspect.run import texts_by_weight
    texts = texts_by_weight(cap)
    if not texts:
        return section("attention", text, "<p>(this model's UNet has no cross-attention layers)</p>"), []
    slots = prompt_slots(pipe.loaded, texts[0], library)
    written = write_attention(out, result.image, capture_maps(cap, texts[0])[0], slots)
    return section("attention", text, figure("attention.png", text["attention"][0])), written["words"]


def is_builtin(loaded) -> bool:
    """Whether the model is the shipped ShapeWorld one (the judge only reads ShapeWorld images)."""
    from easel.weights.registry import BUILTIN_FILE
    return bool(loaded.source) and Path(loaded.source).resolve() == BUILTIN_FILE.resolve()


def judge_section(text: dict, prompt: str, image, word_files: list[Path]) -> str:
    """The judge's verdict, and each judged word's attention map framed green (followed) or red (not)."""
    from easel.inspect.judged import judge_prompt
    judged = judge_prompt(prompt, image)
    if judged is None:
        return section("judge", text, "<p>(the prompt is not in the ShapeWorld caption grammar: nothing to judge)</p>")
    head = (f"<p><b>{html.escape(text['passed'])}</b></p>" if judged.passed else
            f"<p><b>{html.escape(text['failed'])}</b>: {html.escape(judged.reason)}</p>")
    head += f"<p>{html.escape(text['seen'])}: {html.escape(judged.seen)}</p>"
    cards = []
    for w in judged.words:
        src = next((p for p in word_files if p.stem.split("-", 1)[-1] == w.word), None)
        img = f'<img src="words/{html.escape(src.name)}" alt="{html.escape(w.word)}">' if src else ""
        mark = "&#10003;" if w.followed else "&#10007;"
        cards.append(f'<div class="word {"ok" if w.followed else "miss"}">{img}<p><b>{mark} {html.escape(w.word)}</b> '
                     f"({w.kind}): {html.escape(w.reason)}</p></div>")
    return section("judge", text, head + f'<div class="words">{"".join(cards)}</div>')


def decode_section(out: Path, text: dict, pics, cap) -> str:
    """The final latent's channels beside its VAE decode."""
    from easel.files import save_image
    from easel.inspect import draw
    last = _runs(cap)[-1].steps[-1].x0[0]
    panel = draw.grid([draw.captioned(pics.mosaic(last), "latent"), draw.captioned(pics.decode(last), "VAE decode")],
                      cols=2, pad=10)
    save_image(panel, out / "decode.png")
    return section("decode", text, figure("decode.png", text["decode"][0]))


def noise_section(out: Path, text: dict, pipe, result, seed: int) -> str:
    """Forward diffusion of this run's image, and the training noise schedule."""
    from easel.files import save_image
    from easel.inspect import noise as nz
    from easel.inspect.steps import StepPictures
    from easel.pipelines import common
    schedule = common.make_schedule(pipe.loaded.model)
    latent = common.encode(pipe.loaded.model, [result.image.convert("RGB")])[0].cpu()
    row = nz.noise_row(latent, schedule, nz.row_timesteps(schedule.num_timesteps, 6), seed=seed)
    save_image(nz.noise_figure(StepPictures(pipe.loaded), latent, row), out / "noise.png")
    cfg = pipe.loaded.model.config
    label = f"{cfg.beta_schedule}, betas {cfg.beta_start:g}..{cfg.beta_end:g}, {schedule.num_timesteps} timesteps"
    save_image(nz.schedule_figure(nz.schedule_series(schedule), label), out / "noise-schedule.png")
    return section("noise", text, figure("noise.png", text["noise"][0])
                   + sub("noise_schedule", text, figure("noise-schedule.png", text["noise_schedule"][0])))


def clip_section(out: Path, text: dict, pipe, seed: int) -> str:
    """The image-text CLIP matrix and nearest captions where the model has an image tower, else the text-text
    matrix of ShapeWorld captions."""
    from easel.inspect.clip import image_tower, write_image_text, write_text_text
    tower = image_tower(None, pipe.loaded)
    if tower is None:
        write_text_text(pipe.loaded, 8, seed, out)
        return section("clip", text, figure("clip.png", text["clip"][0]))
    write_image_text(pipe.loaded, 8, seed, out, tower)
    return section("clip", text, figure("clip.png", text["clip_images"][0])
                   + sub("nearest", text, figure("nearest.png", text["nearest"][0])), head="clip_images")
