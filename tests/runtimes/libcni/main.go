// hulk-libcni drives CNI plugins through libcni (Debian's
// golang-github-appc-cni-dev, 1.1.2) exactly as containerd 1.6 and podman
// 4.3 do: AddNetworkList / CheckNetworkList / DelNetworkList on a conflist,
// with a result cache directory, so the plugin sees the same stdin, CNI_ARGS,
// prevResult and version checks as under those runtimes.
//
//	hulk-libcni [flags] add|check|del
//	hulk-libcni [flags] -n N bench     (N x ADD then DEL, printing timings)
//
// ADD prints the result as JSON on stdout. Any failure prints
// "error: ..." on stderr and exits 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

type kvList [][2]string

func (l *kvList) String() string { return fmt.Sprint(*l) }

func (l *kvList) Set(value string) error {
	key, val, ok := strings.Cut(value, "=")
	if !ok {
		return fmt.Errorf("want KEY=VALUE, got %q", value)
	}
	*l = append(*l, [2]string{key, val})
	return nil
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	os.Exit(1)
}

func main() {
	conflist := flag.String("conflist", "", "the network configuration list")
	pluginDirs := flag.String("path", "/usr/lib/cni", "plugin directories, colon separated")
	cacheDir := flag.String("cachedir", "", "libcni's result cache directory")
	netns := flag.String("netns", "", "the container's network namespace path")
	id := flag.String("id", "", "the container ID")
	ifname := flag.String("ifname", "eth0", "the interface name")
	caps := flag.String("cap", "", "capability arguments as a JSON object (runtimeConfig)")
	samples := flag.Int("n", 20, "bench: how many ADD/DEL pairs")
	var args kvList
	flag.Var(&args, "arg", "a CNI_ARGS pair KEY=VALUE (repeatable)")
	flag.Parse()
	if flag.NArg() != 1 || *conflist == "" || *cacheDir == "" || *id == "" {
		fail(fmt.Errorf("usage: hulk-libcni -conflist F -cachedir D -id ID [-netns P] add|check|del|bench"))
	}

	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		fail(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(*pluginDirs, ":"), *cacheDir, nil)
	rt := &libcni.RuntimeConf{
		ContainerID: *id,
		NetNS:       *netns,
		IfName:      *ifname,
		Args:        args,
	}
	if *caps != "" {
		if err := json.Unmarshal([]byte(*caps), &rt.CapabilityArgs); err != nil {
			fail(fmt.Errorf("-cap: %w", err))
		}
	}
	ctx := context.Background()

	switch flag.Arg(0) {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		out, err := json.Marshal(result)
		if err != nil {
			fail(err)
		}
		fmt.Println(string(out))
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "bench":
		// Timed in-process, around libcni's own calls: what a runtime waits.
		var timings struct {
			AddMs []float64 `json:"add_ms"`
			DelMs []float64 `json:"del_ms"`
		}
		base := *id
		for i := 0; i < *samples; i++ {
			rt.ContainerID = fmt.Sprintf("%s-%d", base, i)
			start := time.Now()
			if _, err := cni.AddNetworkList(ctx, list, rt); err != nil {
				fail(fmt.Errorf("sample %d: %w", i, err))
			}
			timings.AddMs = append(timings.AddMs, float64(time.Since(start).Microseconds())/1000)
			start = time.Now()
			if err := cni.DelNetworkList(ctx, list, rt); err != nil {
				fail(fmt.Errorf("sample %d: %w", i, err))
			}
			timings.DelMs = append(timings.DelMs, float64(time.Since(start).Microseconds())/1000)
		}
		out, _ := json.Marshal(timings)
		fmt.Println(string(out))
	default:
		fail(fmt.Errorf("unknown command %q", flag.Arg(0)))
	}
}
