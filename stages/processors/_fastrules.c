/* The rules stage's hot loop in C: whole-word keyword scan, cooldowns and alerts for one batch.
 *
 * Why: with keywords everywhere, the Python loop paid ~600 bytecodes per hit (word-boundary
 * checks, state keys, alert dicts). This module does the same work for the common rule
 * shape (match: word, no window) and gives exactly the result of the Python path in
 * rules.py, which stays the reference: tests/test_rules_native.py holds the two equal.
 *
 * A whole word is a maximal run of word characters (str.isalnum() or "_", as `\w` in
 * Python's re); a keyword of several words matches consecutive words. A non-ASCII text is put in NFC (the
 * Python `nfc`), then lowered with str.lower() (the Python `fold` when that changes the length or writes a
 * final sigma), as in rules.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    Py_UCS4 *chars;
    Py_ssize_t len;
    Py_hash_t hash;
} Word;

/* The rules a keyword belongs to: read as C, so a hit costs no tuple or int unpacking. */
typedef struct {
    Py_ssize_t rule;
    PyObject *keyword; /* exact str, held by `held` */
} Owner;

typedef struct {
    Owner *items;
    Py_ssize_t n;
    PyObject *held; /* the (rule index, keyword) tuples they were read from */
} Owners;

typedef struct {
    Word *rest; /* the words after the first */
    Py_ssize_t n_rest;
    Owners owners;
} Phrase;

typedef struct {
    Word word;
    Owners owners; /* n == 0: the word only starts phrases */
    Phrase *phrases;
    Py_ssize_t n_phrases;
} Entry;

typedef struct {
    Entry *entries;
    Py_ssize_t n_entries;
    Py_ssize_t *slots; /* open addressing: index into entries, -1 = empty */
    Py_ssize_t mask;
    int shift; /* 64 - log2(mask + 1): a hash's top bits pick its first slot */
    PyObject *source; /* canonical channel name, the alert's data.source_channel */
} Table;

typedef struct {
    PyObject *prefix, *label, *severity, *names; /* names: a callable or NULL */
    PyObject *data_tpl; /* the alert's data with this rule's label and severity, copied per alert */
    long long cooldown_ms;
} Rule;

/* The event keys an alert copies (rules.py's _IDS, then _STAMPS), in order; "data" goes between the two. */
#define N_HEAD 5
#define N_IDS 3

/* State keys ("<rule>|<stream>") of the streams seen last: a stream id arrives as a new str each time, so
 * without this every cooldown check would build and hash its key again. */
#define KEY_CACHE 8

typedef struct {
    PyObject *stream; /* exact str, or NULL */
    PyObject **keys;  /* per rule, built on first use */
} KeySlot;

typedef struct {
    PyObject_HEAD
    KeySlot cache[KEY_CACHE];
    int next_slot;
    Table *tables;
    Py_ssize_t n_tables;
    PyObject *channel_map; /* dict: channel name -> table index */
    PyObject **names;      /* its keys (exact str), compared by content: a channel value has no cached hash */
    Py_ssize_t *name_table, n_names;
    Rule *rules;
    Py_ssize_t n_rules;
    Py_ssize_t *kw_off; /* per rule: where its matched keywords start in a Scratch's kw (n_rules + 1 offsets) */
    PyObject *heads[1 << N_HEAD]; /* alert templates by which head keys the event has, built on first use */
    PyObject *fold, *nfc, *event_time_ms, *stream_of, *cooled, *source_of;
    int busy; /* process() calls running: Python code they call must not rebuild what they read */
} Engine;

typedef struct {
    Py_ssize_t start, len;
    Py_hash_t hash;
} Token;

static PyObject *s_channel, *s_data, *s_text, *s_start, *s_rtstream_id, *s_rtstream_name, *s_capture_session_id,
    *s_ts, *s_unix_ts, *s_alert, *s_origin, *s_rules, *s_event_label, *s_timestamp, *s_severity, *s_matched,
    *s_source_channel, *s_lower, *s_empty, *s_get, *s_pop, *s_final_sigma;

static unsigned char ascii_word[128], ascii_lower[128];

/* ASCII text is scanned as it is, lowered character by character on the way: kind ASCII_LOWERED */
#define ASCII_LOWERED 0

static inline int is_word(Py_UCS4 ch) {
    if (ch < 128) return ascii_word[ch];
    return Py_UNICODE_ISALNUM(ch);
}

static inline Py_UCS4 at(int kind, const void *data, Py_ssize_t i) {
    return kind == ASCII_LOWERED ? ascii_lower[((const Py_UCS1 *)data)[i]] : PyUnicode_READ(kind, data, i);
}

static inline Py_hash_t mix(Py_hash_t h, Py_UCS4 ch) {
    return (Py_hash_t)(((uint64_t)h ^ (uint64_t)ch) * 1099511628211ULL);
}

#define HASH_SEED ((Py_hash_t)1469598103934665603ULL)

/* A word's first slot in table t: the top bits of the hash times 2^64 / golden ratio (Fibonacci hashing). The
 * hash's low bits depend only on the low bits of the characters (a multiply carries upwards only), and the slot
 * used to be those: every keyword made of characters that agree in their low 16 bits (U+10000, U+20000,
 * U+30000...) took one slot, and 6,561 such keywords made one probe chain that ordinary words fell into, 55x
 * slower per event. (The hash's own top bits are poorly spread for short words: 7 probes a miss, not 2.) */
#define FIRST_SLOT(t, hash) ((Py_ssize_t)(((uint64_t)(hash) * 0x9E3779B97F4A7C15ULL) >> (t)->shift))

/* ---- building ------------------------------------------------------------------------------------------ */

static int word_from_str(PyObject *s, Word *w) {
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "a keyword word must be a str");
        return -1;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    w->chars = PyMem_Malloc(sizeof(Py_UCS4) * (n ? n : 1));
    if (!w->chars) {
        PyErr_NoMemory();
        return -1;
    }
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    Py_hash_t h = HASH_SEED;
    for (Py_ssize_t i = 0; i < n; i++) {
        w->chars[i] = PyUnicode_READ(kind, data, i);
        h = mix(h, w->chars[i]);
    }
    w->len = n;
    w->hash = h;
    return 0;
}

static void owners_clear(Owners *o) {
    PyMem_Free(o->items);
    Py_CLEAR(o->held);
    o->items = NULL;
    o->n = 0;
}

/* owners: a tuple of (rule index, keyword); each index below n_rules is counted in per_rule */
static int owners_build(Owners *o, PyObject *owners, Py_ssize_t n_rules, Py_ssize_t *per_rule) {
    if (!PyTuple_Check(owners)) {
        PyErr_SetString(PyExc_TypeError, "owners must be a tuple");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(owners);
    o->held = Py_NewRef(owners);
    o->items = PyMem_Calloc(n ? n : 1, sizeof(Owner));
    if (!o->items) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(owners, i), *keyword;
        Py_ssize_t rule;
        if (!PyArg_ParseTuple(pair, "nU", &rule, &keyword)) return -1;
        if (rule < 0 || rule >= n_rules || !PyUnicode_CheckExact(keyword)) {
            PyErr_SetString(PyExc_ValueError, "owners: (rule index, str keyword)");
            return -1;
        }
        o->items[i].rule = rule;
        o->items[i].keyword = keyword;
        o->n = i + 1;
        per_rule[rule]++;
    }
    return 0;
}

static void table_clear(Table *t) {
    if (t->entries) {
        for (Py_ssize_t i = 0; i < t->n_entries; i++) {
            Entry *e = &t->entries[i];
            PyMem_Free(e->word.chars);
            owners_clear(&e->owners);
            for (Py_ssize_t p = 0; p < e->n_phrases; p++) {
                for (Py_ssize_t r = 0; r < e->phrases[p].n_rest; r++) PyMem_Free(e->phrases[p].rest[r].chars);
                PyMem_Free(e->phrases[p].rest);
                owners_clear(&e->phrases[p].owners);
            }
            PyMem_Free(e->phrases);
        }
        PyMem_Free(t->entries);
    }
    PyMem_Free(t->slots);
    Py_XDECREF(t->source);
    memset(t, 0, sizeof(*t));
}

/* spec: (dict first word -> (owners tuple or None, tuple of (rest words tuple, owners tuple)), source str).
 * per_rule[r] counts the owners naming rule r. */
static int table_build(Table *t, PyObject *spec, Py_ssize_t n_rules, Py_ssize_t *per_rule) {
    PyObject *words, *source;
    if (!PyArg_ParseTuple(spec, "O!U", &PyDict_Type, &words, &source)) return -1;
    Py_ssize_t n = PyDict_GET_SIZE(words);
    t->source = Py_NewRef(source);
    t->entries = PyMem_Calloc(n ? n : 1, sizeof(Entry));
    Py_ssize_t cap = 8;
    t->shift = 61;
    while (cap < 2 * n + 2) {
        cap <<= 1;
        t->shift--;
    }
    t->slots = PyMem_Malloc(sizeof(Py_ssize_t) * cap);
    if (!t->entries || !t->slots) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < cap; i++) t->slots[i] = -1;
    t->mask = cap - 1;
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (PyDict_Next(words, &pos, &key, &value)) {
        Entry *e = &t->entries[i];
        t->n_entries = i + 1;
        PyObject *owners, *phrases;
        if (!PyArg_ParseTuple(value, "OO!", &owners, &PyTuple_Type, &phrases)) return -1;
        if (word_from_str(key, &e->word) < 0) return -1;
        if (owners != Py_None && owners_build(&e->owners, owners, n_rules, per_rule) < 0) return -1;
        Py_ssize_t np = PyTuple_GET_SIZE(phrases);
        if (np) {
            e->phrases = PyMem_Calloc(np, sizeof(Phrase));
            if (!e->phrases) {
                PyErr_NoMemory();
                return -1;
            }
        }
        for (Py_ssize_t p = 0; p < np; p++) {
            PyObject *rest, *powners;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(phrases, p), "O!O!", &PyTuple_Type, &rest, &PyTuple_Type, &powners))
                return -1;
            Phrase *ph = &e->phrases[p];
            e->n_phrases = p + 1;
            if (owners_build(&ph->owners, powners, n_rules, per_rule) < 0) return -1;
            Py_ssize_t nr = PyTuple_GET_SIZE(rest);
            ph->rest = PyMem_Calloc(nr ? nr : 1, sizeof(Word));
            if (!ph->rest) {
                PyErr_NoMemory();
                return -1;
            }
            for (Py_ssize_t r = 0; r < nr; r++) {
                ph->n_rest = r + 1;
                if (word_from_str(PyTuple_GET_ITEM(rest, r), &ph->rest[r]) < 0) return -1;
            }
        }
        Py_ssize_t slot = FIRST_SLOT(t, e->word.hash);
        while (t->slots[slot] >= 0) slot = (slot + 1) & t->mask;
        t->slots[slot] = i;
        i++;
    }
    return 0;
}

static void cache_clear(Engine *self) {
    for (int c = 0; c < KEY_CACHE; c++) {
        KeySlot *k = &self->cache[c];
        if (k->keys)
            for (Py_ssize_t r = 0; r < self->n_rules; r++) Py_XDECREF(k->keys[r]);
        PyMem_Free(k->keys);
        Py_CLEAR(k->stream);
        k->keys = NULL;
    }
}

static inline int same_str(PyObject *a, PyObject *b) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    return n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

/* The state key of rule `idx` for `stream` (a new reference). */
static PyObject *state_key(Engine *self, Py_ssize_t idx, PyObject *stream) {
    if (!PyUnicode_CheckExact(stream)) return PyUnicode_Concat(self->rules[idx].prefix, stream);
    KeySlot *slot = NULL;
    for (int c = 0; c < KEY_CACHE; c++) {
        KeySlot *k = &self->cache[c];
        if (k->stream != NULL && (k->stream == stream || same_str(k->stream, stream))) {
            slot = k;
            break;
        }
    }
    if (slot == NULL) {
        slot = &self->cache[self->next_slot];
        self->next_slot = (self->next_slot + 1) % KEY_CACHE;
        if (slot->keys == NULL) {
            slot->keys = PyMem_Calloc(self->n_rules ? self->n_rules : 1, sizeof(PyObject *));
            if (!slot->keys) return PyErr_NoMemory();
        }
        for (Py_ssize_t r = 0; r < self->n_rules; r++) Py_CLEAR(slot->keys[r]);
        Py_XSETREF(slot->stream, Py_NewRef(stream));
    }
    if (slot->keys[idx] == NULL) {
        slot->keys[idx] = PyUnicode_Concat(self->rules[idx].prefix, stream);
        if (slot->keys[idx] == NULL) return NULL;
    }
    return Py_NewRef(slot->keys[idx]);
}

static void engine_clear_all(Engine *self) {
    cache_clear(self);
    for (Py_ssize_t i = 0; i < self->n_tables; i++) table_clear(&self->tables[i]);
    PyMem_Free(self->tables);
    self->tables = NULL;
    self->n_tables = 0;
    for (Py_ssize_t i = 0; i < self->n_rules; i++) {
        Py_XDECREF(self->rules[i].prefix);
        Py_XDECREF(self->rules[i].label);
        Py_XDECREF(self->rules[i].severity);
        Py_XDECREF(self->rules[i].names);
        Py_XDECREF(self->rules[i].data_tpl);
    }
    for (int m = 0; m < (1 << N_HEAD); m++) Py_CLEAR(self->heads[m]);
    PyMem_Free(self->rules);
    self->rules = NULL;
    self->n_rules = 0;
    PyMem_Free(self->kw_off);
    self->kw_off = NULL;
    Py_CLEAR(self->channel_map);
    for (Py_ssize_t i = 0; i < self->n_names; i++) Py_XDECREF(self->names[i]);
    PyMem_Free(self->names);
    PyMem_Free(self->name_table);
    self->names = NULL;
    self->name_table = NULL;
    self->n_names = 0;
    Py_CLEAR(self->fold);
    Py_CLEAR(self->nfc);
    Py_CLEAR(self->event_time_ms);
    Py_CLEAR(self->stream_of);
    Py_CLEAR(self->cooled);
    Py_CLEAR(self->source_of);
}

static void Engine_dealloc(Engine *self) {
    engine_clear_all(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Engine(tables, channel_map, rules, fold, nfc, event_time_ms, stream_of, cooled, source_of)
 * rules: list of (prefix, label, severity, cooldown_ms, names callable or None) */
static int engine_build(Engine *self, PyObject *args) {
    PyObject *tables, *channel_map, *rules;
    PyObject *fold, *nfc, *etm, *stream_of, *cooled, *source_of;
    if (!PyArg_ParseTuple(args, "O!O!O!OOOOOO", &PyList_Type, &tables, &PyDict_Type, &channel_map, &PyList_Type,
                          &rules, &fold, &nfc, &etm, &stream_of, &cooled, &source_of))
        return -1;
    engine_clear_all(self);
    Py_ssize_t nt = PyList_GET_SIZE(tables), nr = PyList_GET_SIZE(rules);
    self->tables = PyMem_Calloc(nt ? nt : 1, sizeof(Table));
    self->rules = PyMem_Calloc(nr ? nr : 1, sizeof(Rule));
    self->kw_off = PyMem_Calloc(nr + 1, sizeof(Py_ssize_t));
    if (!self->tables || !self->rules || !self->kw_off) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nt; i++) {  /* kw_off[r + 1]: first the owners naming rule r */
        self->n_tables = i + 1;
        if (table_build(&self->tables[i], PyList_GET_ITEM(tables, i), nr, self->kw_off + 1) < 0) return -1;
    }
    for (Py_ssize_t r = 0; r < nr; r++) self->kw_off[r + 1] += self->kw_off[r];  /* then where each one starts */
    for (Py_ssize_t i = 0; i < nr; i++) {
        PyObject *prefix, *label, *severity, *names;
        long long cd;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(rules, i), "UUULO", &prefix, &label, &severity, &cd, &names))
            return -1;
        Rule *r = &self->rules[i];
        self->n_rules = i + 1;
        r->prefix = Py_NewRef(prefix);
        r->label = Py_NewRef(label);
        r->severity = Py_NewRef(severity);
        r->names = names == Py_None ? NULL : Py_NewRef(names);
        r->cooldown_ms = cd;
        /* key order as rules.py's _fire; None values are replaced per alert */
        r->data_tpl = PyDict_New();
        if (!r->data_tpl || PyDict_SetItem(r->data_tpl, s_event_label, label) < 0 ||
            PyDict_SetItem(r->data_tpl, s_timestamp, Py_None) < 0 || PyDict_SetItem(r->data_tpl, s_text, Py_None) < 0 ||
            PyDict_SetItem(r->data_tpl, s_severity, severity) < 0 ||
            PyDict_SetItem(r->data_tpl, s_matched, Py_None) < 0 ||
            PyDict_SetItem(r->data_tpl, s_source_channel, Py_None) < 0)
            return -1;
    }
    self->channel_map = Py_NewRef(channel_map);
    Py_ssize_t nn = PyDict_GET_SIZE(channel_map), pos = 0;
    self->names = PyMem_Calloc(nn ? nn : 1, sizeof(PyObject *));
    self->name_table = PyMem_Calloc(nn ? nn : 1, sizeof(Py_ssize_t));
    if (!self->names || !self->name_table) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *name, *ti;
    while (PyDict_Next(channel_map, &pos, &name, &ti)) {
        Py_ssize_t t = PyLong_AsSsize_t(ti);
        if (!PyUnicode_CheckExact(name) || t < 0 || t >= self->n_tables) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "channel_map: str -> table index");
            return -1;
        }
        self->names[self->n_names] = Py_NewRef(name);
        self->name_table[self->n_names++] = t;
    }
    self->fold = Py_NewRef(fold);
    self->nfc = Py_NewRef(nfc);
    self->event_time_ms = Py_NewRef(etm);
    self->stream_of = Py_NewRef(stream_of);
    self->cooled = Py_NewRef(cooled);
    self->source_of = Py_NewRef(source_of);
    return 0;
}

/* Builds the engine; a failed build leaves none (process() then refuses), never a half-built one. */
static int Engine_init(Engine *self, PyObject *args, PyObject *Py_UNUSED(kw)) {
    if (self->busy) {  /* a callback of a running process(): its tables and scratch would be freed under it */
        PyErr_SetString(PyExc_RuntimeError, "Engine.__init__ called while the engine is processing a batch");
        return -1;
    }
    if (engine_build(self, args) == 0) return 0;
    engine_clear_all(self);
    return -1;
}

/* The table for a channel value, or NULL. */
static const Table *table_of(Engine *self, PyObject *ch) {
    if (!PyUnicode_CheckExact(ch)) {  /* a str subclass: by the dict, as Python would (the caller holds it) */
        PyObject *ti = PyDict_GetItemWithError(self->channel_map, ch);
        return ti == NULL ? NULL : &self->tables[PyLong_AsSsize_t(ti)];
    }
    for (Py_ssize_t i = 0; i < self->n_names; i++)
        if (same_str(self->names[i], ch)) return &self->tables[self->name_table[i]];
    return NULL;
}

/* x.get(key) as the Python path reads it: a new reference, or NULL (absent; or an error, if one is set). An
 * exact dict is read directly; anything else by its own get(): a dict subclass's, or AttributeError as in Python. */
static PyObject *get(PyObject *x, PyObject *key) {
    if (PyDict_CheckExact(x)) return Py_XNewRef(PyDict_GetItemWithError(x, key));
    return PyObject_CallMethodOneArg(x, s_get, key);
}

/* ---- scanning ------------------------------------------------------------------------------------------ */

static inline Entry *lookup(const Table *t, int kind, const void *data, const Token *tok) {
    Py_ssize_t slot = FIRST_SLOT(t, tok->hash);
    for (;;) {
        Py_ssize_t idx = t->slots[slot];
        if (idx < 0) return NULL;
        Entry *e = &t->entries[idx];
        if (e->word.hash == tok->hash && e->word.len == tok->len) {
            Py_ssize_t k = 0;
            while (k < tok->len && at(kind, data, tok->start + k) == e->word.chars[k]) k++;
            if (k == tok->len) return e;
        }
        slot = (slot + 1) & t->mask;
    }
}

static inline int same(int kind, const void *data, const Token *tok, const Word *w) {
    if (tok->hash != w->hash || tok->len != w->len) return 0;
    for (Py_ssize_t k = 0; k < w->len; k++)
        if (at(kind, data, tok->start + k) != w->chars[k]) return 0;
    return 1;
}

/* Scratch space for one batch: per rule, the keywords the current event matched, as borrowed pointers: a
 * list is made only for a rule that fires (with a cooldown, most hits do not). */
typedef struct {
    PyObject **kw;     /* rule r's keywords are kw[kw_off[r]] .. kw[kw_off[r] + n_kw[r] - 1], in the order found */
    Py_ssize_t *n_kw;  /* n_rules */
    const Py_ssize_t *kw_off;
    Py_ssize_t *touched; /* the rules with n_kw > 0 */
    Py_ssize_t n_touched;
    Py_ssize_t *firing; /* the current event's rules that fire, in rule order */
    Py_ssize_t n_firing;
    long long *fired; /* alerts per rule in this batch, added to `counts` at the end */
} Scratch;

static void scratch_reset(Scratch *s) {
    for (Py_ssize_t i = 0; i < s->n_touched; i++) s->n_kw[s->touched[i]] = 0;
    s->n_touched = 0;
    s->n_firing = 0;
}

/* Each owner's keyword to its rule's matched keywords, unless an equal one is there (`keyword not in found`).
 * Room is never short: a rule holds at most as many keywords as owners name it. */
static void add_owners(Scratch *s, const Owners *o) {
    for (Py_ssize_t i = 0; i < o->n; i++) {
        Py_ssize_t rule = o->items[i].rule, n = s->n_kw[rule];
        PyObject *keyword = o->items[i].keyword, **found = s->kw + s->kw_off[rule];
        if (n == 0) s->touched[s->n_touched++] = rule;
        Py_ssize_t k = 0;
        while (k < n && found[k] != keyword && !same_str(found[k], keyword)) k++;
        if (k == n) {
            found[n] = keyword;
            s->n_kw[rule] = n + 1;
        }
    }
}

/* Rule r's matched keywords as a new list (the alert's data.matched). */
static PyObject *matched_list(const Scratch *s, Py_ssize_t rule) {
    Py_ssize_t n = s->n_kw[rule];
    PyObject *list = PyList_New(n), *const *found = s->kw + s->kw_off[rule];
    for (Py_ssize_t k = 0; list && k < n; k++) PyList_SET_ITEM(list, k, Py_NewRef(found[k]));
    return list;
}

/* The next word at or after *pos (kind ASCII_LOWERED: ASCII as it is, lowered on the way); 0 at the end.
 * Words are found one at a time, so a text costs no memory however many words it holds. */
static inline int next_word(int kind, const void *data, Py_ssize_t n, Py_ssize_t *pos, Token *tok) {
    Py_ssize_t i = *pos;
    Py_hash_t h = HASH_SEED;
    if (kind == ASCII_LOWERED) {
        const Py_UCS1 *p = data;
        while (i < n && !ascii_word[p[i]]) i++;
        if (i >= n) return 0;
        tok->start = i;
        do h = mix(h, ascii_lower[p[i]]);
        while (++i < n && ascii_word[p[i]]);
    } else {
        Py_UCS4 ch = 0;
        while (i < n && !is_word(ch = PyUnicode_READ(kind, data, i))) i++;
        if (i >= n) return 0;
        tok->start = i;
        do h = mix(h, ch);
        while (++i < n && is_word(ch = PyUnicode_READ(kind, data, i)));
    }
    tok->len = i - tok->start;
    tok->hash = h;
    *pos = i;
    return 1;
}

/* A keyword's word in the text: its keywords (and the phrases it starts) into s. `end`: where it ends. */
static void word_found(Scratch *s, const Entry *e, int kind, const void *data, Py_ssize_t n, Py_ssize_t end) {
    for (Py_ssize_t p = 0; p < e->n_phrases; p++) {  /* the phrase's other words must follow */
        const Phrase *ph = &e->phrases[p];
        Py_ssize_t at = end, r = 0;
        Token next;
        while (r < ph->n_rest && next_word(kind, data, n, &at, &next) && same(kind, data, &next, &ph->rest[r])) r++;
        if (r == ph->n_rest) add_owners(s, &ph->owners);
    }
    add_owners(s, &e->owners);
}

/* Fill s for one text (kind ASCII_LOWERED, or a lowered str's kind).
 * Words are looked up as they are found: no memory per word, however long the text. */
static void scan(Scratch *s, const Table *t, int kind, const void *data, Py_ssize_t n) {
    Py_ssize_t i = 0;
    Token tok;
    if (kind == ASCII_LOWERED) {
        const Py_UCS1 *p = data;
        while (i < n) {
            Py_UCS1 c = p[i];
            if (!ascii_word[c]) {
                i++;
                continue;
            }
            Py_ssize_t start = i;
            Py_hash_t h = HASH_SEED;
            do {
                h = mix(h, ascii_lower[c]);
                if (++i >= n) break;
                c = p[i];
            } while (ascii_word[c]);
            tok.start = start;
            tok.len = i - start;
            tok.hash = h;
            const Entry *e = lookup(t, kind, data, &tok);
            if (e != NULL) word_found(s, e, kind, data, n, i);
        }
        return;
    }
    while (next_word(kind, data, n, &i, &tok)) {
        const Entry *e = lookup(t, kind, data, &tok);
        if (e != NULL) word_found(s, e, kind, data, n, i);
    }
}

/* ---- firing -------------------------------------------------------------------------------------------- */

/* An event time read once: `fits` when it is an exact int within +-2**62, compared as `v` from then on. */
typedef struct {
    PyObject *obj;
    long long v;
    int fits;
} Time;

static inline Time time_of(PyObject *x) {
    Time t = {x, 0, 0};
    if (PyLong_CheckExact(x)) {
        int over;
        t.v = PyLong_AsLongLongAndOverflow(x, &over);
        t.fits = !over && t.v < (1LL << 62) && t.v > -(1LL << 62);
    }
    return t;
}

/* a < b: exact for ints of any size and for whatever else Python compares */
static inline int less(const Time *a, const Time *b) {
    return a->fits && b->fits ? a->v < b->v : PyObject_RichCompareBool(a->obj, b->obj, Py_LT);
}

/* last <= when < last + cooldown: the rule is quiet for this stream */
static int cooling(Engine *self, PyObject *last, const Time *when, long long cooldown) {
    Time l = time_of(last);
    if (l.fits && when->fits && cooldown < (1LL << 60)) return l.v <= when->v && when->v < l.v + cooldown;
    PyObject *cd = PyLong_FromLongLong(cooldown);
    if (!cd) return -1;
    PyObject *res = PyObject_CallFunctionObjArgs(self->cooled, last, when->obj, cd, NULL);
    Py_DECREF(cd);
    if (!res) return -1;
    int quiet = PyObject_IsTrue(res);
    Py_DECREF(res);
    return quiet;
}

/* The cooldown writes of one batch, kept until it ends: if it fails, they are taken back in reverse (as
 * rules.py's _undo), so the retry of its events one by one finds the state as it was. */
typedef struct {
    PyObject *map;     /* last_fired */
    PyObject *changed; /* a change-tracking dict's set of written keys, or NULL: write through map[key] = value */
    PyObject **keys, **olds; /* olds[i] NULL: keys[i] was absent */
    Py_ssize_t n, cap;
} Writes;

/* map[key] = value, as the map's own __setitem__ does it (with `changed`: dict's setitem, then the key noted) */
static int state_set(const Writes *w, PyObject *key, PyObject *value) {
    if (w->changed != NULL) return PyDict_SetItem(w->map, key, value) < 0 ? -1 : PySet_Add(w->changed, key);
    return PyDict_CheckExact(w->map) ? PyDict_SetItem(w->map, key, value) : PyObject_SetItem(w->map, key, value);
}

/* map.pop(key, None) */
static int state_pop(const Writes *w, PyObject *key) {
    if (w->changed == NULL && !PyDict_CheckExact(w->map)) {
        PyObject *res = PyObject_CallMethodObjArgs(w->map, s_pop, key, Py_None, NULL);
        Py_XDECREF(res);
        return res == NULL ? -1 : 0;
    }
    int has = PyDict_Contains(w->map, key);
    if (has <= 0) return has;
    return PyDict_DelItem(w->map, key) < 0 ? -1 : w->changed != NULL ? PySet_Add(w->changed, key) : 0;
}

/* Note that key's value was `old` (a reference taken over; NULL: absent), then write `value`. */
static int write_noted(Writes *w, PyObject *key, PyObject *old, PyObject *value) {
    if (w->n == w->cap) {
        Py_ssize_t cap = w->cap ? 2 * w->cap : 64;
        PyObject **keys = PyMem_Realloc(w->keys, sizeof(PyObject *) * cap);
        if (keys) w->keys = keys;
        PyObject **olds = keys ? PyMem_Realloc(w->olds, sizeof(PyObject *) * cap) : NULL;
        if (!olds) {
            Py_XDECREF(old);
            PyErr_NoMemory();
            return -1;
        }
        w->olds = olds;
        w->cap = cap;
    }
    w->keys[w->n] = Py_NewRef(key);
    w->olds[w->n++] = old;
    return state_set(w, key, value);
}

/* Forget the notes; with `undo`, first put every written key back as it was (the current error kept). */
static void writes_end(Writes *w, int undo) {
    PyObject *type, *value, *tb;
    if (undo) PyErr_Fetch(&type, &value, &tb);
    for (Py_ssize_t i = w->n - 1; i >= 0; i--) {
        if (undo && (w->olds[i] ? state_set(w, w->keys[i], w->olds[i]) : state_pop(w, w->keys[i])) < 0)
            PyErr_Clear();
        Py_DECREF(w->keys[i]);
        Py_XDECREF(w->olds[i]);
    }
    if (undo) PyErr_Restore(type, value, tb);
    PyMem_Free(w->keys);
    PyMem_Free(w->olds);
    w->keys = w->olds = NULL;
    w->n = w->cap = 0;
}

static PyObject *s_head[N_HEAD + 1]; /* rtstream_id, rtstream_name, capture_session_id, ts, unix_ts; channel */
static Py_hash_t head_hash[N_HEAD + 1];
/* Events with more keys than this are read by lookups (a pass over them would cost more). */
#define HEAD_SCAN_MAX 16

/* The alert template for events holding the head keys in `mask`: {"channel": "alert", "origin": "rules",
 * <ids>: None, "data": None, <stamps>: None}. A copy of a small dict is a memcpy, where filling a new
 * one inserts (and hashes into place) every key. */
static PyObject *head_template(Engine *self, int mask) {
    if (self->heads[mask]) return self->heads[mask];
    PyObject *d = PyDict_New();
    if (!d || PyDict_SetItem(d, s_channel, s_alert) < 0 || PyDict_SetItem(d, s_origin, s_rules) < 0) goto fail;
    for (int k = 0; k < N_HEAD; k++) {
        if (k == N_IDS && PyDict_SetItem(d, s_data, Py_None) < 0) goto fail;
        if ((mask >> k & 1) && PyDict_SetItem(d, s_head[k], Py_None) < 0) goto fail;
    }
    self->heads[mask] = d;
    return d;
fail:
    Py_XDECREF(d);
    return NULL;
}

/* One alert: a copy of `first` (this event's first alert, same head) or of the head template filled in. */
static PyObject *make_alert(Engine *self, const Rule *r, PyObject *first, PyObject **head, int mask,
                            PyObject *text, PyObject *when, PyObject *matched, PyObject *source) {
    PyObject *data = PyDict_Copy(r->data_tpl);
    if (!data || PyDict_SetItem(data, s_timestamp, when) < 0 || PyDict_SetItem(data, s_text, text) < 0 ||
        PyDict_SetItem(data, s_matched, matched) < 0 || PyDict_SetItem(data, s_source_channel, source) < 0) {
        Py_XDECREF(data);
        return NULL;
    }
    PyObject *alert = NULL;
    if (first != NULL) {
        alert = PyDict_Copy(first);
    } else {
        PyObject *tpl = head_template(self, mask);
        alert = tpl ? PyDict_Copy(tpl) : NULL;
        for (int k = 0; alert && k < N_HEAD; k++)
            if ((mask >> k & 1) && PyDict_SetItem(alert, s_head[k], head[k]) < 0) Py_CLEAR(alert);
    }
    if (alert && PyDict_SetItem(alert, s_data, data) < 0) Py_CLEAR(alert);
    Py_DECREF(data);
    return alert;
}

/* The head keys' values and the channel (new references or NULL) of an exact dict of a few exact-str keys, in
 * one pass over it: a key's cached hash is compared with each name's before their text, where a lookup per
 * name costs a whole probe. 0: read; -1: not such a dict (nothing read, no error). */
static int read_head_at_once(PyObject *event, PyObject **head, PyObject **channel) {
    PyObject *key, *value, *found[N_HEAD + 1] = {NULL};
    Py_ssize_t pos = 0;
    if (!PyDict_CheckExact(event) || PyDict_GET_SIZE(event) > HEAD_SCAN_MAX) return -1;
    while (PyDict_Next(event, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key)) return -1;  /* equal by its own __eq__, perhaps */
        Py_hash_t h = ((PyASCIIObject *)key)->hash;
        for (int k = 0; k <= N_HEAD; k++)
            if (h == head_hash[k] && (key == s_head[k] || same_str(key, s_head[k]))) {
                found[k] = value;
                break;
            }
    }
    for (int k = 0; k < N_HEAD; k++) head[k] = Py_XNewRef(found[k]);
    *channel = Py_XNewRef(found[N_HEAD]);
    return 0;
}

/* The alerts of the rules in s->firing (appended to `alerts`), as the end of rules.py's Rules._fire. */
static int make_alerts(Engine *self, Scratch *s, PyObject *event, PyObject *text, PyObject *when, PyObject *ch,
                       PyObject *source, PyObject *alerts) {
    PyObject *head[N_HEAD] = {NULL}, *now = NULL;
    int mask = 0, rc = -1;
    /* read once, as the Python path does, and held while alerts are built */
    if (read_head_at_once(event, head, &now) < 0) {
        for (int k = 0; k < N_HEAD; k++) {
            if (PyDict_CheckExact(event)) {
                head[k] = Py_XNewRef(PyDict_GetItemWithError(event, s_head[k]));
                if (head[k] == NULL && PyErr_Occurred()) goto done;
            } else {  /* `k in event`, then event[k]: a subclass's own methods */
                int has = PySequence_Contains(event, s_head[k]);
                if (has < 0 || (has && (head[k] = PyObject_GetItem(event, s_head[k])) == NULL)) goto done;
            }
        }
        /* data.source_channel: the Python path's source_of(the channel read now). The table's name while that
         * is still the exact str the table was found by; code run since (a text's lower()) may have changed it. */
        now = get(event, s_channel);
        if (now == NULL && PyErr_Occurred()) goto done;
    }
    for (int k = 0; k < N_HEAD; k++) mask |= (head[k] != NULL) << k;
    if (now != ch || !PyUnicode_CheckExact(ch)) {
        source = PyObject_CallOneArg(self->source_of, now ? now : Py_None);
        if (!source) goto done;
        Py_XSETREF(now, source);  /* held until the alerts are built */
    }
    PyObject *first = NULL;
    for (Py_ssize_t k = 0; k < s->n_firing; k++) {
        Py_ssize_t idx = s->firing[k];
        PyObject *matched = matched_list(s, idx);
        PyObject *alert = matched ? make_alert(self, &self->rules[idx], first, head, mask, text, when, matched, source)
                                  : NULL;
        Py_XDECREF(matched);
        if (!alert) goto done;
        int appended = PyList_Append(alerts, alert);
        Py_DECREF(alert);
        if (appended < 0) goto done;
        if (first == NULL) first = alert;  /* held by `alerts` */
        s->fired[idx]++;
    }
    rc = 0;
done:
    for (int k = 0; k < N_HEAD; k++) Py_XDECREF(head[k]);
    Py_XDECREF(now);
    return rc;
}

/* The alerts one event fires (appended to `alerts`), as rules.py's Rules._fire. */
static int fire(Engine *self, Scratch *s, PyObject *event, PyObject *data, PyObject *text, PyObject *ch, PyObject *source,
                Writes *writes, Time *watermark, const Time *ceiling, PyObject *alerts) {
    int rc = -1;
    PyObject *when = NULL, *stream = NULL, *name = NULL;
    PyObject *start = get(data, s_start);
    if (start != NULL && PyLong_CheckExact(start)) {
        when = start;
    } else {
        Py_XDECREF(start);
        if (PyErr_Occurred()) return -1;
        when = PyObject_CallOneArg(self->event_time_ms, event);
        if (!when) return -1;
    }
    PyObject *rid = get(event, s_rtstream_id);
    if (rid != NULL && PyUnicode_CheckExact(rid) && PyUnicode_GET_LENGTH(rid) > 0) {
        stream = rid;
    } else {
        Py_XDECREF(rid);
        if (PyErr_Occurred()) goto done;
        stream = PyObject_CallOneArg(self->stream_of, event);
        if (!stream) goto done;
    }
    Time now = time_of(when);
    int below = less(watermark, &now);
    if (below < 0) goto done;
    if (below) {
        int above = less(ceiling, &now);
        if (above < 0) goto done;
        if (!above) {
            Py_SETREF(watermark->obj, Py_NewRef(when));
            watermark->v = now.v;
            watermark->fits = now.fits;
        } else {  /* ahead of the wall clock: the watermark goes up to the clock, no further (Eviction.seen) */
            int short_of = less(watermark, ceiling);
            if (short_of < 0) goto done;
            if (short_of) {
                Py_SETREF(watermark->obj, Py_NewRef(ceiling->obj));
                watermark->v = ceiling->v;
                watermark->fits = ceiling->fits;
            }
        }
    }
    /* rule order, as the Python path's sorted(hits) */
    for (Py_ssize_t a = 1; a < s->n_touched; a++) {
        Py_ssize_t v = s->touched[a], b = a;
        while (b > 0 && s->touched[b - 1] > v) {
            s->touched[b] = s->touched[b - 1];
            b--;
        }
        s->touched[b] = v;
    }
    for (Py_ssize_t k = 0; k < s->n_touched; k++) {
        Py_ssize_t idx = s->touched[k];
        Rule *r = &self->rules[idx];
        if (r->names) {
            if (name == NULL) {
                PyObject *raw = get(event, s_rtstream_name);  /* held: its __bool__ may drop it from the event */
                if (raw == NULL && PyErr_Occurred()) goto done;
                int truthy = raw == NULL ? 0 : PyObject_IsTrue(raw);
                name = truthy > 0 ? PyObject_Str(raw) : truthy == 0 ? Py_NewRef(s_empty) : NULL;
                Py_XDECREF(raw);
                if (!name) goto done;
            }
            PyObject *ok = PyObject_CallOneArg(r->names, name);
            if (!ok) goto done;
            int yes = PyObject_IsTrue(ok);
            Py_DECREF(ok);
            if (yes < 0) goto done;
            if (!yes) continue;
        }
        if (r->cooldown_ms) {
            PyObject *key = state_key(self, idx, stream);
            if (!key) goto done;
            PyObject *last = PyDict_GetItemWithError(writes->map, key);
            if (last == NULL && PyErr_Occurred()) {
                Py_DECREF(key);
                goto done;
            }
            Py_XINCREF(last);
            if (last != NULL && last != Py_None) {  /* None: no time saved, as the Python path's get() */
                int quiet = cooling(self, last, &now, r->cooldown_ms);
                if (quiet) {
                    Py_DECREF(last);
                    Py_DECREF(key);
                    if (quiet < 0) goto done;
                    continue;
                }
            }
            /* noted before it is written: if the batch fails later, it is taken back, so the retry of its
             * events one by one fires this alert again instead of finding the rule cooling down */
            int set = write_noted(writes, key, last, when);
            Py_DECREF(key);
            if (set < 0) goto done;
        }
        s->firing[s->n_firing++] = idx;
    }
    rc = s->n_firing ? make_alerts(self, s, event, text, when, ch, source, alerts) : 0;
done:
    Py_XDECREF(when);
    Py_XDECREF(stream);
    Py_XDECREF(name);
    return rc;
}

/* out[*n:] = src[from:to], as a slice (src may have shrunk since `to` was read); out has room for it */
static void copy_range(PyObject *out, Py_ssize_t *n, PyObject *src, Py_ssize_t from, Py_ssize_t to) {
    for (Py_ssize_t i = from; i < to && i < PyList_GET_SIZE(src); i++)
        PyList_SET_ITEM(out, (*n)++, Py_NewRef(PyList_GET_ITEM(src, i)));
}

/* process(batch, last_fired, changed, watermark, ceiling, counts) -> (out batch or None, alerts, watermark)
 * changed: None, or the set a change-tracking last_fired notes written keys in (its __setitem__ is then
 * dict's own plus that note, done here without a Python call). A batch that fails writes nothing. */
static PyObject *Engine_process(Engine *self, PyObject *args) {
    PyObject *batch, *last_fired, *changed, *wm, *ceil, *counts;
    if (!PyArg_ParseTuple(args, "O!O!OOOO!", &PyList_Type, &batch, &PyDict_Type, &last_fired, &changed, &wm, &ceil,
                          &PyList_Type, &counts))
        return NULL;
    if (changed != Py_None && !PySet_Check(changed)) {
        PyErr_SetString(PyExc_TypeError, "changed must be a set or None");
        return NULL;
    }
    Writes writes = {last_fired, changed == Py_None ? NULL : changed, NULL, NULL, 0, 0};
    if (PyList_GET_SIZE(counts) != self->n_rules) {
        PyErr_SetString(PyExc_ValueError, "counts must hold one int per rule");
        return NULL;
    }
    if (self->kw_off == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.__init__ was not called (or failed)");
        return NULL;
    }
    self->busy++;  /* until `done`: Python code called from here must not rebuild the engine */
    Scratch s = {0};
    PyObject *out = NULL, *alerts = PyList_New(0), *result = NULL, *held = NULL, *held_ch = NULL;
    Py_ssize_t *marks = NULL, n_marks = 0, cap_marks = 0; /* per firing event: its index, then alerts so far */
    Time watermark = time_of(Py_NewRef(wm)), ceiling = time_of(ceil);  /* watermark.obj: held */
    s.kw = PyMem_Malloc(sizeof(PyObject *) * (self->kw_off[self->n_rules] ? self->kw_off[self->n_rules] : 1));
    s.n_kw = PyMem_Calloc(self->n_rules ? self->n_rules : 1, sizeof(Py_ssize_t));
    s.kw_off = self->kw_off;
    s.touched = PyMem_Malloc(sizeof(Py_ssize_t) * (self->n_rules ? self->n_rules : 1));
    s.firing = PyMem_Malloc(sizeof(Py_ssize_t) * (self->n_rules ? self->n_rules : 1));
    s.fired = PyMem_Calloc(self->n_rules ? self->n_rules : 1, sizeof(long long));
    if (!alerts || !s.kw || !s.n_kw || !s.touched || !s.firing || !s.fired) {
        if (alerts) PyErr_NoMemory();
        goto done;
    }
    /* the size is read again each time: code called from here (a str subclass's lower()) may shrink the list */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *event = PyList_GET_ITEM(batch, i);
        Py_XSETREF(held, Py_NewRef(event));  /* code called below (a str subclass's hash) may drop it from the batch */
        /* read as the Python path reads (get(); AttributeError for what has none); each value held, as Python
         * code run by a lookup (a key's __eq__, a channel's __hash__) may drop it from where it was */
        PyObject *ch = get(event, s_channel);
        Py_XSETREF(held_ch, ch);  /* to the alert, where the channel is read again */
        if (ch == NULL || !PyUnicode_Check(ch)) {
            if (PyErr_Occurred()) goto done;
            continue;
        }
        const Table *t = table_of(self, ch);
        if (t == NULL) {
            if (PyErr_Occurred()) goto done;
            continue;
        }
        PyObject *data = get(event, s_data);
        if (data == NULL || !PyDict_Check(data)) {
            Py_XDECREF(data);
            if (PyErr_Occurred()) goto done;
            continue;
        }
        PyObject *text = get(data, s_text);
        /* `not text`: a subclass's own truth (__bool__, __len__) */
        int empty = text == NULL || !PyUnicode_Check(text) ? 1
                    : PyUnicode_CheckExact(text)           ? PyUnicode_GET_LENGTH(text) == 0
                                                           : PyObject_Not(text);
        if (empty) {
            Py_XDECREF(text);
            Py_DECREF(data);
            if (PyErr_Occurred()) goto done;
            continue;
        }
        int bad;
        if (PyUnicode_CheckExact(text) && PyUnicode_IS_ASCII(text)) {  /* a subclass's own lower() is called */
            scan(&s, t, ASCII_LOWERED, PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text));
            bad = 0;
        } else {  /* in NFC unless ASCII, then str.lower(), or fold() where lowering changes the length, as rules.py */
            PyObject *norm = PyUnicode_IS_ASCII(text) ? Py_NewRef(text) : PyObject_CallOneArg(self->nfc, text);
            if (norm && !PyUnicode_Check(norm)) {
                PyErr_Format(PyExc_TypeError, "nfc() returned %.100s, not str", Py_TYPE(norm)->tp_name);
                Py_CLEAR(norm);
            }
            PyObject *low = norm ? PyObject_CallMethodNoArgs(norm, s_lower) : NULL;
            if (low && PyUnicode_Check(low)) {  /* "İ" changes the length; "Σ" may lower to "ς": fold() then */
                int refold = PyUnicode_GET_LENGTH(low) != PyUnicode_GET_LENGTH(norm)
                                 ? 1 : PySequence_Contains(low, s_final_sigma);
                if (refold < 0) Py_CLEAR(low);
                else if (refold) Py_SETREF(low, PyObject_CallOneArg(self->fold, norm));
            }
            Py_XDECREF(norm);
            if (low && !PyUnicode_Check(low)) {  /* a str subclass's lower(): never read a non-str as text */
                PyErr_Format(PyExc_TypeError, "text.lower() returned %.100s, not str", Py_TYPE(low)->tp_name);
                Py_CLEAR(low);
            }
            bad = low == NULL;
            if (!bad) scan(&s, t, PyUnicode_KIND(low), PyUnicode_DATA(low), PyUnicode_GET_LENGTH(low));
            Py_XDECREF(low);
        }
        Py_ssize_t before = PyList_GET_SIZE(alerts);
        if (!bad && s.n_touched)
            bad = fire(self, &s, event, data, text, ch, t->source, &writes, &watermark, &ceiling, alerts) < 0;
        scratch_reset(&s);
        Py_DECREF(text);
        Py_DECREF(data);
        if (bad) goto done;
        Py_ssize_t after = PyList_GET_SIZE(alerts);
        if (after == before) continue;
        if (n_marks + 2 > cap_marks) {
            cap_marks = cap_marks ? 2 * cap_marks : 64;
            Py_ssize_t *grown = PyMem_Realloc(marks, sizeof(Py_ssize_t) * cap_marks);
            if (!grown) {
                PyErr_NoMemory();
                goto done;
            }
            marks = grown;
        }
        marks[n_marks++] = i;
        marks[n_marks++] = after;
    }
    /* each alert right after its source event, the rest cut from the batch as it is now, as the Python path
     * does (code called above may have changed the list since an event was read) */
    if (n_marks) {
        Py_ssize_t prev = 0, from = 0, filled = 0;
        out = PyList_New(PyList_GET_SIZE(batch) + PyList_GET_SIZE(alerts));  /* the most it can hold */
        if (!out) goto done;
        for (Py_ssize_t m = 0; m < n_marks; m += 2) {
            copy_range(out, &filled, batch, prev, marks[m] + 1);
            copy_range(out, &filled, alerts, from, marks[m + 1]);
            prev = marks[m] + 1;
            from = marks[m + 1];
        }
        copy_range(out, &filled, batch, prev, PyList_GET_SIZE(batch));
        Py_SET_SIZE(out, filled);  /* fewer if the batch shrank: the slots past `filled` were never set */
    }
    for (Py_ssize_t r = 0; r < self->n_rules; r++) {
        if (!s.fired[r]) continue;
        if (r >= PyList_GET_SIZE(counts)) {  /* Python code called above emptied it: counts[r] += n fails */
            PyErr_SetString(PyExc_IndexError, "list index out of range");
            goto done;
        }
        PyObject *add = PyLong_FromLongLong(s.fired[r]);
        PyObject *sum = add ? PyNumber_Add(PyList_GET_ITEM(counts, r), add) : NULL;
        Py_XDECREF(add);
        if (!sum) goto done;
        if (PyList_SetItem(counts, r, sum) < 0) goto done;  /* its __add__ may have emptied the list */
    }
    result = Py_BuildValue("(OOO)", out ? out : Py_None, alerts, watermark.obj);
done:
    writes_end(&writes, result == NULL);
    self->busy--;
    Py_XDECREF(held);
    Py_XDECREF(held_ch);
    PyMem_Free(marks);
    scratch_reset(&s);
    PyMem_Free(s.kw);
    PyMem_Free(s.n_kw);
    PyMem_Free(s.touched);
    PyMem_Free(s.firing);
    PyMem_Free(s.fired);
    Py_XDECREF(out);
    Py_XDECREF(alerts);
    Py_DECREF(watermark.obj);
    return result;
}

static PyMethodDef Engine_methods[] = {
    {"process", (PyCFunction)Engine_process, METH_VARARGS,
     "process(batch, last_fired, changed, watermark, ceiling, counts) -> (out batch or None, alerts, watermark)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "stages.processors._fastrules.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Whole-word rules over a batch: scan, cooldowns, alerts (the Python path in rules.py is the reference).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastrules", "The rules stage's hot loop in C.", -1, NULL, NULL, NULL, NULL, NULL};

#define INTERN(var, text)                                 \
    do {                                                  \
        if (!(var = PyUnicode_InternFromString(text))) return NULL; \
    } while (0)

PyMODINIT_FUNC PyInit__fastrules(void) {
    for (int c = 0; c < 128; c++) {
        ascii_word[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        ascii_lower[c] = (unsigned char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    INTERN(s_channel, "channel");
    INTERN(s_data, "data");
    INTERN(s_text, "text");
    INTERN(s_start, "start");
    INTERN(s_rtstream_id, "rtstream_id");
    INTERN(s_rtstream_name, "rtstream_name");
    INTERN(s_capture_session_id, "capture_session_id");
    INTERN(s_ts, "ts");
    INTERN(s_unix_ts, "unix_ts");
    INTERN(s_alert, "alert");
    INTERN(s_origin, "origin");
    INTERN(s_rules, "rules");
    INTERN(s_event_label, "event_label");
    INTERN(s_timestamp, "timestamp");
    INTERN(s_severity, "severity");
    INTERN(s_matched, "matched");
    INTERN(s_source_channel, "source_channel");
    INTERN(s_lower, "lower");
    INTERN(s_get, "get");
    INTERN(s_pop, "pop");
    INTERN(s_empty, "");
    if (!(s_final_sigma = PyUnicode_FromOrdinal(0x3c2))) return NULL;
    s_head[0] = s_rtstream_id;
    s_head[1] = s_rtstream_name;
    s_head[2] = s_capture_session_id;
    s_head[3] = s_ts;
    s_head[4] = s_unix_ts;
    s_head[N_HEAD] = s_channel;
    for (int k = 0; k <= N_HEAD; k++)
        if ((head_hash[k] = PyObject_Hash(s_head[k])) == -1) return NULL;
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
