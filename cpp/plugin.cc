// The C++ half of the nix-winvm plugin: registers the builtins, turns the user's Nix values into
// the bridge's Node tree, asks the Rust planner for a plan, and creates the planned derivations
// with Nix's own `derivation` so that string context, drvPath and outputs behave as usual.
//
// Nothing here knows about VMs: all decisions are made in src/plugin/ (safe Rust).
#include "nix_compat.hh"
#include "nix-winvm/src/plugin/ffi.rs.h"

#include <dlfcn.h>
#include <climits>
#include <cstdlib>
#include <iostream>
#include <map>

// Mutable and external so that the compiler keeps one copy, read at load time: the tests patch
// it in a copy of the plugin to prove the refusal.
extern "C" {
char nix_winvm_built_for[] = NIX_WINVM_BUILT_FOR;
}

namespace {

using nix_winvm::Kind;
using nix_winvm::Node;
using nix_winvm::Plan;
using nix_winvm::PlannedAttr;
using nix_winvm::PlannedDrv;
using nix_winvm::Source;

std::string plugin_dir()
{
    Dl_info info;
    if (dladdr(reinterpret_cast<void *>(&plugin_dir), &info) == 0 || info.dli_fname == nullptr) return ".";
    char resolved[PATH_MAX];
    std::string file = realpath(info.dli_fname, resolved) ? resolved : info.dli_fname;
    auto slash = file.rfind('/');
    return slash == std::string::npos ? "." : file.substr(0, slash);
}

// A Nix string may hold any bytes; the Rust side decides where they must be UTF-8.
rust::Vec<uint8_t> bytes(std::string_view s)
{
    rust::Vec<uint8_t> out;
    out.reserve(s.size());
    for (char c : s) out.push_back(static_cast<uint8_t>(c));
    return out;
}

struct Converter
{
    nix::EvalState & state;
    nixc::Pos pos;
    std::string builtin;
    rust::Vec<Node> nodes;

    size_t push(std::string_view key)
    {
        Node n{};
        n.kind = Kind::Null;
        n.key = bytes(key);
        nodes.push_back(std::move(n));
        return nodes.size() - 1;
    }

    // `depth` is how many more levels may be forced; `top` marks the argument's own attributes,
    // whose depth the planner chooses by name.
    void fill(size_t at, nix::Value & val, uint32_t depth, bool top_level_children)
    {
        if (depth == 0) {
            nodes[at].kind = Kind::Unforced;
            return;
        }
        nixc::force(state, val, pos);
        switch (val.type()) {
        case nix::nNull: nodes[at].kind = Kind::Null; break;
        case nix::nBool: nodes[at].kind = Kind::Bool; nodes[at].int_value = nixc::bool_of(val); break;
        case nix::nInt: nodes[at].kind = Kind::Int; nodes[at].int_value = nixc::int_of(val); break;
        case nix::nFloat: nodes[at].kind = Kind::Float; nodes[at].float_value = nixc::float_of(val); break;
        case nix::nString: {
            nodes[at].kind = Kind::Str;
            nodes[at].text = bytes(nixc::string_text(val));
            nodes[at].context = nixc::string_has_context(val);
            break;
        }
        case nix::nPath: {
            nodes[at].kind = Kind::Path;
            nodes[at].text = bytes(nixc::path_text(val));
            break;
        }
        case nix::nFunction: nodes[at].kind = Kind::Function; break;
        case nix::nExternal: nodes[at].kind = Kind::External; break;
        case nix::nList: {
            auto items = nixc::list_items(val);
            size_t first = nodes.size();
            for (size_t i = 0; i < items.size(); i++) push("");
            nodes[at].kind = Kind::List;
            nodes[at].first = first;
            nodes[at].count = items.size();
            for (size_t i = 0; i < items.size(); i++) fill(first + i, *items[i], depth - 1, false);
            break;
        }
        case nix::nAttrs: {
            if (state.isDerivation(val)) {
                nodes[at].kind = Kind::Derivation;
                if (auto * spec = nixc::find_attr(state, val, "winvmImageSpec")) {
                    nixc::force(state, *spec, pos);
                    if (spec->type() == nix::nString) {
                        nodes[at].text = bytes(nixc::string_text(*spec));
                        nodes[at].int_value = 1;
                    }
                }
                // An image of this plugin's names the memory stage builds on it use.
                if (nixc::find_attr(state, val, "winvmMemory")) nodes[at].int_value |= 2;
                break;
            }
            // Sorted by name so that the planner (and its error messages) are deterministic.
            std::map<std::string, nix::Value *> sorted;
            for (auto & attr : *nixc::attrs_of(val))
                sorted.emplace(std::string(nixc::symbol_text(state, attr.name)), nixc::attr_value(attr));
            size_t first = nodes.size();
            for (auto & [name, _] : sorted) push(name);
            nodes[at].kind = Kind::Set;
            nodes[at].first = first;
            nodes[at].count = sorted.size();
            size_t i = 0;
            for (auto & [name, child] : sorted) {
                uint32_t d = top_level_children
                    ? nix_winvm::force_depth(builtin, rust::Slice<const uint8_t>(reinterpret_cast<const uint8_t *>(name.data()), name.size()))
                    : depth - 1;
                fill(first + i++, *child, d, false);
            }
            break;
        }
        default: nodes[at].kind = Kind::Unforced; break;
        }
    }
};

struct Executor
{
    nix::EvalState & state;
    nixc::Pos pos;
    nix::Value * root;
    std::vector<nix::Value *> stages;

    nix::Value * user_value(const rust::Vec<rust::String> & path)
    {
        nix::Value * cur = root;
        for (auto & seg : path) {
            nixc::force(state, *cur, pos);
            std::string key(seg);
            if (cur->type() == nix::nAttrs) {
                cur = nixc::find_attr(state, *cur, key);
            } else if (cur->type() == nix::nList) {
                auto items = nixc::list_items(*cur);
                size_t i = std::strtoul(key.c_str(), nullptr, 10);
                cur = i < items.size() ? items[i] : nullptr;
            } else {
                cur = nullptr;
            }
            if (!cur) nixc::throw_eval_error(state, pos, "nix-winvm: internal error: planned value '" + key + "' is missing");
        }
        return cur;
    }

    nix::Value * value_of(const PlannedAttr & a)
    {
        switch (a.source) {
        case Source::User: return user_value(a.path);
        case Source::Stage:
            if (a.stage >= stages.size()) nixc::throw_eval_error(state, pos, "nix-winvm: internal error: bad stage");
            return stages[a.stage];
        default: break;
        }
        nix::Value * val = nixc::alloc_value(state);
        switch (a.source) {
        case Source::Text: nixc::mk_string(state, *val, std::string(a.text)); break;
        case Source::StorePath: {
            // Pure evaluation reads no host path: a store path the store has is named with its
            // context (no builtins.storePath, which pure mode refuses); only an impure
            // evaluation may copy the host copy into a store that lacks it (the same
            // content-addressed path).
            std::string root(a.list[0]), host(a.list[1]);
            if (!root.empty() && nixc::store_path_valid(state, root)) {
                nixc::mk_store_string(state, *val, std::string(a.text), root);
            } else if (!host.empty() && !nixc::pure_eval(state)) {
                nixc::host_path(state, *val, host, pos);
            } else {
                nixc::throw_eval_error(state, pos, std::string(a.list[2]));
            }
            break;
        }
        case Source::Int: nixc::mk_int(*val, a.int_value); break;
        case Source::Bool: nixc::mk_bool(*val, a.int_value != 0); break;
        case Source::StrList: {
            std::vector<std::string> items;
            for (auto & s : a.list) items.emplace_back(s);
            nixc::mk_string_list(state, *val, items);
            break;
        }
        default: nixc::throw_eval_error(state, pos, "nix-winvm: internal error: unknown attribute source");
        }
        return val;
    }

    nix::Value * derivation(const PlannedDrv & d)
    {
        auto bindings = nixc::build_bindings(state, d.attrs.size());
        for (auto & a : d.attrs) nixc::bind(state, bindings, std::string(a.name), value_of(a));
        // Values handed to callFunction must live on the GC heap: a stack Value aborts later,
        // when the lazy result is forced.
        nix::Value * arg = nixc::alloc_value(state);
        nixc::mk_attrs(*arg, bindings);
        nix::Value * result = nixc::alloc_value(state);
        nixc::call_builtin(state, "derivation", *arg, *result, pos);
        return result;
    }

    void run(const Plan & plan, nix::Value & v)
    {
        for (auto & d : plan.drvs) stages.push_back(derivation(d));
        if (stages.empty()) nixc::throw_eval_error(state, pos, "nix-winvm: internal error: empty plan");
        if (plan.result >= stages.size()) nixc::throw_eval_error(state, pos, "nix-winvm: internal error: bad result");
        nix::Value & last = *stages[plan.result];
        if (plan.passthru.empty()) {
            v = last;
            return;
        }
        nixc::force_attrs(state, last, pos);
        auto * attrs = nixc::attrs_of(last);
        auto bindings = nixc::build_bindings(state, attrs->size() + plan.passthru.size());
        for (auto & attr : *attrs) bindings.insert(attr);
        for (auto & a : plan.passthru) nixc::bind(state, bindings, std::string(a.name), value_of(a));
        nixc::mk_attrs(v, bindings);
    }
};

void call(const char * builtin, nix::EvalState & state, nixc::Pos pos, nix::Value * root, nix::Value & v)
{
    Converter conv{state, pos, builtin, {}};
    conv.push("");
    conv.fill(0, *root, UINT32_MAX, true);
    Plan plan = nix_winvm::plan(builtin, conv.nodes, plugin_dir());
    if (!plan.error.empty()) nixc::throw_eval_error(state, pos, std::string(plan.error));
    Executor{state, pos, root, {}}.run(plan, v);
}

// Every entry from Nix into the shim goes through here: Nix's own errors (with their traces)
// pass on; anything else (rust::Error, std::bad_alloc, a foreign exception) becomes an
// evaluation error at the call site instead of terminating the user's `nix`.
template<typename F> void guarded(const char * builtin, nix::EvalState & state, nixc::Pos pos, F && body)
{
    std::string what;
    try {
        body();
        return;
    } catch (nix::Error &) {
        throw;
    } catch (std::exception & e) {
        what = e.what();
    } catch (...) {
        what = "an unknown exception";
    }
    nixc::throw_eval_error(state, pos, std::string("nix-winvm: internal error in ") + builtin + ": " + what);
}

NIXC_PRIMOP(prim_windowsImage)
{
    guarded("windowsImage", state, pos, [&] { call("windowsImage", state, pos, args[0], v); });
}

NIXC_PRIMOP(prim_windowsDerivation)
{
    guarded("windowsDerivation", state, pos, [&] { call("windowsDerivation", state, pos, args[0], v); });
}

NIXC_PRIMOP(prim_runInWindowsVM)
{
    guarded("runInWindowsVM", state, pos, [&] {
        nixc::force(state, *args[0], pos);
        nix::Value * root = args[0];
        if (args[0]->type() == nix::nAttrs) {
            root = nixc::find_attr(state, *args[0], "drvAttrs");
            if (!root)
                nixc::throw_eval_error(state, pos,
                    "runInWindowsVM: the argument must be a derivation, got a set without 'drvAttrs'");
        }
        call("runInWindowsVM", state, pos, root, v);
    });
}

// How the `nix` process named this file when it loaded it: a relative path breaks later,
// because Nix's build hook reloads plugin-files from another working folder.
std::string loaded_as()
{
    Dl_info info;
    if (dladdr(reinterpret_cast<void *>(&loaded_as), &info) == 0 || info.dli_fname == nullptr) return "";
    return info.dli_fname;
}

struct Registrar
{
    Registrar()
    {
        // A static constructor: an exception escaping it would terminate the user's `nix`.
        try {
            register_all();
        } catch (std::exception & e) {
            std::cerr << "nix-winvm: could not register the builtins: " << e.what() << "\n";
        } catch (...) {
            std::cerr << "nix-winvm: could not register the builtins: an unknown exception\n";
        }
    }

    static void register_all()
    {
        std::string running = nixc::nix_version();
        if (running != nix_winvm_built_for) {
            std::cerr << "nix-winvm: this plugin was built for Nix " << nix_winvm_built_for << " but is loaded into Nix "
                      << running << "; rebuild it against this Nix's headers. Its builtins are not registered.\n";
            return;
        }
        std::string file = loaded_as();
        if (!file.empty() && file[0] != '/') {
            std::cerr << "nix-winvm: the plugin was loaded as '" << file
                      << "', a relative path; give --plugin-files (or plugin-files) an absolute path, because Nix's "
                         "build hook reloads plugins from another folder. Its builtins are not registered.\n";
            return;
        }
        nixc::register_primop("__windowsImage", 1,
            "Return the derivation of a suspended VM image: `guest` (\"windows\" or \"standin\"), "
            "`memory`, `cpus`, `accel`, `timeout`, and for Windows `iso`, `edition`, ...; or, given `base` (an "
            "image) and `installCommands`, a layer: that image with the commands run in it. See nix-winvm's README.",
            {"attrs"}, prim_windowsImage);
        nixc::register_primop("__windowsDerivation", 1,
            "Return a derivation that runs `script` in a VM revived from `image`; other attributes "
            "pass into the build environment as with `derivation`.",
            {"attrs"}, prim_windowsDerivation);
        nixc::register_primop("__runInWindowsVM", 1,
            "Return the given derivation, built inside the VM of its `windowsImage` attribute "
            "(the historic nixpkgs vmTools interface).",
            {"drv"}, prim_runInWindowsVM);
    }
};

Registrar registrar;

} // namespace
