// The eStargz reference implementation (containerd's stargz-snapshotter
// estargz package, Debian's source) as a command, for scripts/e2e/estargz.sh:
//
//	estargz-ref build IN.tar OUT [PREFETCH...]   prints the TOC digest
//	estargz-ref list BLOB TOC_DIGEST             verifies; prints NAME<TAB>SIZE<TAB>DIGEST per regular file
package main

import (
	"compress/gzip"
	"crypto/sha256"
	"fmt"
	"io"
	"log"
	"os"
	"sort"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) < 4 {
		log.Fatal("usage: estargz-ref build IN OUT [PREFETCH...] | list BLOB TOC_DIGEST")
	}
	switch os.Args[1] {
	case "build":
		build(os.Args[2], os.Args[3], os.Args[4:])
	case "list":
		list(os.Args[2], os.Args[3])
	default:
		log.Fatalf("unknown command %q", os.Args[1])
	}
}

func build(in, out string, prefetch []string) {
	f, err := os.Open(in)
	must(err)
	st, err := f.Stat()
	must(err)
	opts := []estargz.Option{estargz.WithChunkSize(1 << 20), estargz.WithCompressionLevel(gzip.BestSpeed)}
	if len(prefetch) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prefetch))
	}
	blob, err := estargz.Build(io.NewSectionReader(f, 0, st.Size()), opts...)
	must(err)
	defer blob.Close()
	o, err := os.Create(out)
	must(err)
	_, err = io.Copy(o, blob)
	must(err)
	must(o.Close())
	fmt.Println(blob.TOCDigest())
}

func list(path, toc string) {
	f, err := os.Open(path)
	must(err)
	st, err := f.Stat()
	must(err)
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	must(err)
	_, err = r.VerifyTOC(digest.Digest(toc))
	must(err)
	var names []string
	var walk func(dir *estargz.TOCEntry, prefix string)
	walk = func(dir *estargz.TOCEntry, prefix string) {
		dir.ForeachChild(func(base string, e *estargz.TOCEntry) bool {
			if e.Type == "dir" {
				walk(e, prefix+base+"/")
			} else if e.Type == "reg" {
				names = append(names, prefix+base)
			}
			return true
		})
	}
	root, ok := r.Lookup("")
	if !ok {
		log.Fatal("no root")
	}
	walk(root, "")
	sort.Strings(names)
	for _, n := range names {
		e, _ := r.Lookup(n)
		sr, err := r.OpenFile(n)
		must(err)
		h := sha256.New()
		_, err = io.Copy(h, sr)
		must(err)
		got := fmt.Sprintf("sha256:%x", h.Sum(nil))
		if e.Digest != "" && e.Digest != got {
			log.Fatalf("%s: content hashes to %s, the TOC says %s", n, got, e.Digest)
		}
		fmt.Printf("%s\t%d\t%s\n", n, e.Size, got)
	}
}

func must(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
