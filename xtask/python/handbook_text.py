"""Plain prose out of The Debian Administrator's Handbook's HTML (issue 9's
harder evaluation text; `cargo xtask fetch-text` runs this, see
xtask/src/fetch_text.rs for the pins and docs/fidelity.md for why).

usage: handbook_text.py HTML_DIR OUT_FILE

Deterministic, standard library only:
1. the chapters in the order index.html links them (each file once, the
   index page itself, with its legal notice, left out);
2. from each, the text of every `<div class="para">` (DocBook's paragraph),
   nested markup flattened, `<pre>`, `<table>`, `<script>` and `<style>`
   contents dropped (commands, listings and tables are not prose);
3. every whitespace run made one ASCII space, the ends trimmed; paragraphs
   of fewer than 12 words (captions, headings) dropped;
4. paragraphs joined by a blank line, one final newline.
"""
import html.parser
import re
import sys
from pathlib import Path

MIN_WORDS = 12
SKIPPED = ("pre", "table", "script", "style")


class Paragraphs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs = []
        self._text = None  # the open paragraph's pieces, or None outside one
        self._div_depth = 0  # <div>s open inside the paragraph, itself included
        self._skipped = 0  # open elements whose content is dropped

    def handle_starttag(self, tag, attrs):
        if tag in SKIPPED:
            self._skipped += 1
        if tag != "div":
            return
        if self._text is not None:
            self._div_depth += 1
        elif dict(attrs).get("class") == "para":
            self._text, self._div_depth = [], 1

    def handle_endtag(self, tag):
        if tag in SKIPPED and self._skipped:
            self._skipped -= 1
        if tag != "div" or self._text is None:
            return
        self._div_depth -= 1
        if self._div_depth == 0:
            paragraph = re.sub(r"\s+", " ", "".join(self._text)).strip()
            if len(paragraph.split()) >= MIN_WORDS:
                self.paragraphs.append(paragraph)
            self._text = None

    def handle_data(self, data):
        if self._text is not None and not self._skipped:
            self._text.append(data)


def main(html_dir, out_file):
    html_dir = Path(html_dir)
    chapters = []
    index = (html_dir / "index.html").read_text(encoding="utf-8")
    for link in re.findall(r'href="([^"#/]+\.html)', index):
        if link != "index.html" and link not in chapters:
            chapters.append(link)
    paragraphs = []
    for chapter in chapters:
        parser = Paragraphs()
        parser.feed((html_dir / chapter).read_text(encoding="utf-8"))
        parser.close()
        paragraphs += parser.paragraphs
    if not paragraphs:
        sys.exit(f"no paragraphs found under {html_dir}")
    Path(out_file).write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"{len(chapters)} chapters, {len(paragraphs)} paragraphs")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:])
